"""Serving-test helpers: a tiny run directory (config.yaml + a random, non-zero LoRA adapter + a summary, no
training), a scripted model (fixed answers, optionally slowed down), an in-process server and ``qtune serve`` in a
subprocess.

A pytest plugin (tests/conftest.py lists it in ``pytest_plugins``): its fixtures ``tiny_run``, ``engine`` and
``server`` (module-scoped: one per test module that uses them) are available to every test module, which import no
fixtures from one another.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtune.config import save_config
from qtune.model.adapters import lora_config
from qtune.rundir import RunDir
from qtune.serve.engine import Engine, GenerationSettings

from conftest import tiny_run_config

GREEDY = GenerationSettings(max_new_tokens=12)
INDENTED = "    return sorted(xs)\n\n    # done\n"
"""An answer that starts with spaces and ends with a newline: every front end must keep it character for character."""
FILLER = " word" * 480
"""A scripted answer longer than any generation in these tests (each ' word' is one token)."""


def make_tiny_run(model_dir: str, out: Path, random_adapter: bool = True, **sections) -> RunDir:
    """Write a run directory whose adapter has random A and B (so it changes the base's output), or PEFT's own
    initialisation (B = 0, the base's output) when ``random_adapter`` is False."""
    rd = RunDir(Path(out))
    rd.root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_run_config(model_dir, rd.root, **sections)
    save_config(cfg, rd.config)
    torch.manual_seed(0)
    config = lora_config(cfg.lora)
    config.init_lora_weights = not random_adapter
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and random_adapter:
                p.mul_(0.5)
    model.save_pretrained(str(rd.adapter))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(rd.adapter))
    rd.summary.write_text("{}\n")  # the finished marker training writes last
    return rd


@contextmanager
def scripted(engine, text: str | None = None, delay: float = 0.0):
    """Make ``engine``'s model answer ``text`` token for token, then EOS (``text`` None: its own tokens), taking
    at least ``delay`` seconds per forward pass; the real streamer, stop strings and decoding run as usual.

    The script restarts at every prompt (a forward pass over more than one token), so each generation, batched
    or not, answers ``text``.
    """
    tok = engine.tokenizer
    script = None if text is None else tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    step = [0]

    def before(module, args):
        if args[0].shape[-1] > 1:  # a new prompt
            step[0] = 0
        if delay:
            time.sleep(delay)

    def after(module, args, logits):
        if script is None:
            return logits
        forced = torch.full_like(logits, -1e4)
        forced[..., -1, script[min(step[0], len(script) - 1)]] = 0.0
        step[0] += 1
        return forced

    hooks = [
        engine.model.get_input_embeddings().register_forward_pre_hook(before),
        engine.model.get_output_embeddings().register_forward_hook(after),
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def scripted_engines(monkeypatch, text: str | None = None, delay: float = 0.0) -> None:
    """Every Engine created from now on (e.g. by a CLI command) is :func:`scripted` for the rest of the test."""
    from qtune.serve.engine import Engine

    original = Engine.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._script = scripted(self, text, delay)  # kept: a dropped context manager would remove its hooks
        self._script.__enter__()

    monkeypatch.setattr(Engine, "__init__", init)


def slow_serve(argv: list[str], text: str | None, delay: float) -> None:
    """``qtune ARGV`` (e.g. serve) with every engine :func:`scripted` (for a subprocess)."""
    import pytest

    from qtune.cli import app

    with pytest.MonkeyPatch.context() as mp:
        scripted_engines(mp, text, delay)
        app(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(run_dir, text: str | None, delay: float, *options: str):
    """`qtune serve --run RUN_DIR OPTIONS` in a subprocess with its engine :func:`scripted`; yields (process, url)
    once /v1/models answers, and kills the process at the end if it is still running."""
    import httpx

    port = free_port()
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)]), "OMP_NUM_THREADS": "1"}
    argv = ["serve", "--run", str(run_dir), "--port", str(port), *options]
    code = f"import serve_fixtures; serve_fixtures.slow_serve({argv!r}, {text!r}, {delay!r})"
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"qtune serve exited with {process.returncode}: {process.stdout.read()}")
            assert time.time() < deadline, "qtune serve did not start in 120 s"
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    return make_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def engine(tiny_run):
    return Engine(str(tiny_run.root))


@contextmanager
def running(app_):
    """Serve the ASGI app ``app_`` with uvicorn in a thread on a free port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(engine):
    from qtune.serve.api import create_app

    with running(create_app(engine, defaults=GREEDY)) as url:
        yield url
