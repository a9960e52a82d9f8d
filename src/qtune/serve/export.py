"""Export a trained run: the adapter merged into a 16-bit copy of the base (safetensors), or as a GGUF file.

The base is loaded again in fp16 or bf16 (never the 4-bit or 8-bit weights the adapter may have been trained
against: merging into quantized weights would round the update away), the adapter is loaded with PEFT and
folded in with ``merge_and_unload``. Both exports embed the chat template the adapter was trained with
(:func:`qtune.data.templates.export_chat_template`), not the base's, so tools that prompt through the embedded
template (vLLM, llama.cpp's server, Ollama, LM Studio) send the prompt qtune trained on. The output directory
loads with plain ``AutoModelForCausalLM`` and with ``qtune chat/serve --run OUT`` (``qtune.json`` records the
template).

The GGUF file (LLaMA architecture only) is written with the ``gguf`` package's ``GGUFWriter``: fp16 matrices,
fp32 norms, tensor names from ``gguf``'s own name map, q/k rows reordered to the GGUF rotary layout, and the
byte-level BPE tokenizer (tokens, merges, special ids, chat template) as ``tokenizer.ggml.*`` metadata. When the
base came from a GGUF file (the default SmolLM2 does), its ``general.*`` keys (name, basename, organization, size
label, license, languages, ...) and llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``, ``smollm`` for
SmolLM2; llama.cpp's converter picks it from a hash of the tokenizer's output) are carried over, so llama.cpp
splits text as the tokenizer did; only :data:`qtune.serve.gguf_file.GGUF_KEYS_THAT_DIFFER` differ.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from qtune.config import SIXTEEN_BIT
from qtune.data.templates import export_chat_template
from qtune.errors import QtuneError
from qtune.generate import MERGED_META
from qtune.jsonio import dumps
from qtune.rundir import TMP_PREFIX, refuse_user_places

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from qtune.config import RunConfig

MERGE_DTYPES = SIXTEEN_BIT
"""Weight dtypes of a merged export (``--dtype``)."""


def merge_run(run_dir: str | Path, dtype: str = "fp16") -> tuple[PreTrainedModel, PreTrainedTokenizerBase, RunConfig]:
    """(merged model in eval mode, tokenizer, RunConfig): the base loaded in ``dtype`` + the adapter, merged.

    Raises:
        QtuneError: no adapter in ``run_dir``, or a LoftQ adapter (it holds the NF4 quantization error, so merged
            into the unquantized base it would add that error a second time).
    """
    from peft import PeftModel

    from qtune.config import QuantConfig, load_config
    from qtune.model.load import load_model, load_tokenizer, resolve_model
    from qtune.rundir import RunDir

    rd = RunDir(Path(run_dir)).require_adapter()
    cfg = load_config(rd.config, saved_run=True)
    cfg.model.trust_remote_code = False  # as for load_trained: never from a run's config alone
    if cfg.lora.init == "loftq":
        raise QtuneError(
            f"{run_dir}: a LoftQ adapter starts from the NF4 quantization error and only fits the NF4 "
            "base; merging it into a 16-bit base would add that error again (serve the run instead)"
        )
    base = load_model(resolve_model(cfg.model), cfg.model, QuantConfig(quant=dtype))
    merged = PeftModel.from_pretrained(base, str(rd.adapter)).merge_and_unload()
    merged.eval()
    return merged, load_tokenizer(str(rd.adapter), cfg.model), cfg


def export_merged(run_dir: str | Path, out: str | Path, dtype: str = "fp16", overwrite: bool = False) -> Path:
    """Merge the run's adapter into a 16-bit base and save it (safetensors, tokenizer, ``qtune.json``).

    Args:
        run_dir: a run directory with a trained adapter.
        out: output directory; must be absent or empty unless ``overwrite``, which replaces only a directory this
            function wrote (:func:`check_replaceable_export`).
        dtype: "fp16" or "bf16", the weight dtype of the merged model.

    Returns:
        The output directory.

    Raises:
        QtuneError: no adapter in ``run_dir``, ``out`` a file, not empty (or, with ``overwrite``, not an export
            qtune wrote), or an unknown dtype.
    """
    from qtune.rundir import RunDir

    if dtype not in MERGE_DTYPES:
        raise QtuneError(f"--dtype {dtype!r}: expected one of {', '.join(MERGE_DTYPES)}")
    rd = RunDir(Path(run_dir)).require_adapter()
    out = Path(out)
    if (
        out.resolve() == rd.root.resolve()
        or rd.root.resolve() in out.resolve().parents
        or out.resolve() in rd.root.resolve().parents
    ):
        raise QtuneError(f"{out}: the output must lie outside the run directory {rd.root}")
    if out.exists() and not out.is_dir():
        raise QtuneError(f"{out}: exists and is not a directory; choose another --merged")
    replace = out.is_dir() and any(out.iterdir())
    if replace:
        if not overwrite:
            raise QtuneError(f"{out}: output directory exists and is not empty; pass --overwrite or choose another")
        check_replaceable_export(out)
    merged, tokenizer, cfg = merge_run(rd.root, dtype)
    tokenizer.chat_template = export_chat_template(cfg.data.template, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside OUT and renamed into place, qtune.json (listing the files) last: a killed export leaves no
    # half-written OUT
    try:
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{TMP_PREFIX}{out.name}-"))
    except OSError as e:
        raise QtuneError(f"{out}: cannot write ({e.strerror})") from None
    try:
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        meta = {
            "template": cfg.data.template,
            "dtype": dtype,
            "source_run": str(rd.root.resolve()),
            "base_model": cfg.model.name,
            "trained_quant": cfg.quant.quant,
            "lora": {"r": cfg.lora.r, "lora_alpha": cfg.lora.lora_alpha},
            "files": sorted([MERGED_META, *(p.name for p in staging.iterdir())]),
        }
        (staging / MERGED_META).write_text(dumps(meta, indent=2), encoding="utf-8")
    except OSError as e:  # named after the output the user gave, not the staging folder beside it
        shutil.rmtree(staging, ignore_errors=True)
        raise QtuneError(f"{out}: cannot write ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if replace:
        shutil.rmtree(out)
    if out.is_dir():  # an empty folder (perhaps the current directory): kept, the files moved in, qtune.json last
        for f in sorted(staging.iterdir(), key=lambda f: f.name == MERGED_META):
            os.replace(f, out / f.name)
        staging.rmdir()
    else:
        os.replace(staging, out)
    return out


def check_replaceable_export(out: Path) -> None:
    """Raises QtuneError (one line) unless ``--overwrite`` may delete the directory ``out``: a merged model that
    :func:`export_merged` wrote (its ``qtune.json`` lists every file in it), and neither the current nor the home
    directory nor a folder above them."""
    refused = f"{out}: --overwrite refused:"
    way_out = "delete it yourself or choose another --merged"
    refuse_user_places(out, refused, "--merged")
    try:
        files = set(json.loads((out / MERGED_META).read_text(encoding="utf-8")).get("files", []))
    except (OSError, ValueError, AttributeError):
        raise QtuneError(
            f"{refused} no readable {MERGED_META}, so not a merged model qtune exported; {way_out}"
        ) from None
    foreign = sorted(
        e.name + ("/" if e.is_dir() else "") for e in out.iterdir() if e.is_symlink() or e.name not in files
    )
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise QtuneError(f"{refused} it holds {', '.join(foreign[:5])}{more}, which qtune did not write; {way_out}")


def export_gguf(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Merge the run's adapter into an fp16 base and write one GGUF file (LLaMA architecture).

    Args:
        out: the .gguf file to write; must not exist unless ``overwrite`` (which replaces only a GGUF file).

    Returns:
        The written file.

    Raises:
        QtuneError: no adapter in ``run_dir``, the base is not a LLaMA model, its tokenizer is not byte-level
            BPE, ``out`` is a directory, or it exists (without ``overwrite``, or it is not a GGUF file).
    """
    from qtune.rundir import RunDir
    from qtune.serve.gguf_file import GgufLayout, write_gguf

    out = Path(out)
    RunDir(Path(run_dir)).require_adapter()
    _check_gguf_output(out, overwrite)
    model, tokenizer, cfg = merge_run(run_dir, "fp16")
    layout = GgufLayout.of(model, tokenizer, cfg.model)  # raises before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(TMP_PREFIX + out.name)  # renamed to OUT once complete: a killed export leaves no half file
    try:
        write_gguf(staging, layout, tokenizer, cfg, Path(run_dir).resolve().name)
    except OSError as e:  # named after the output the user gave, not the staging file beside it
        _remove(staging)
        raise QtuneError(f"{out}: cannot write ({e.strerror})") from None
    except BaseException:
        _remove(staging)
        raise
    os.replace(staging, out)
    return out


def _check_gguf_output(out: Path, overwrite: bool) -> None:
    """Raises QtuneError (one line) unless ``out`` may be written: not a directory, and absent unless
    ``overwrite``, which replaces only a GGUF file."""
    if out.is_dir():
        raise QtuneError(f"{out}: is a directory; --gguf takes the file to write, e.g. {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise QtuneError(f"{out}: file exists; pass --overwrite or choose another")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise QtuneError(
                    f"{out}: --overwrite refused: not a GGUF file; delete it yourself or choose another --gguf"
                )


def _remove(path: Path) -> None:
    """Delete a staging file if there is one (on a read-only file system even a missing one raises)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
