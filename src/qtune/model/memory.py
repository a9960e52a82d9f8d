"""The analytic memory model: peak training memory of a (quantized) LLaMA-family model + LoRA, from its config.

No weights are read. The model is built on PyTorch's ``meta`` device from its ``config.json`` (shapes only, no
storage), its parameters and buffers are counted module by module, and PEFT attaches the adapter to that meta
model, so the trainable-parameter count is PEFT's own. Each term of :class:`MemoryEstimate` is in bytes and names
its source; the units of the public figures are GiB (2**30 bytes).

Peak allocated memory, the figure ``torch.cuda.max_memory_allocated`` reports, is modelled as

    static (frozen weights + 16->32-bit upcast + quantization constants + trainable params + grads + optimizer)
    + activations saved for the backward pass (all layers, or only the layer inputs under checkpointing)
    + autocast weight copies kept for the backward pass
    + max(logits/loss phase, one layer's backward workspace)

because the cross-entropy buffers over the vocabulary are freed before the backward pass reaches the last
decoder layer. Allocator overhead (reserved minus allocated) is reported apart and is not in ``peak_gib``.
On CPU (peak resident set size) two terms are added: the interpreter, libraries, tokenizer and splits, and the
pages of the memory-mapped checkpoint that loading a quantized model leaves resident. CPU figures assume glibc's
fixed mmap threshold that ``qtune sweep`` sets (:data:`qtune.study.sweep.MMAP_THRESHOLD`); with glibc's default
dynamic threshold the heap keeps freed activations and peak RSS is higher.

The inputs (:class:`TrainShape`) are those of a :class:`qtune.config.RunConfig`: build them with
:meth:`TrainShape.from_config` (or :func:`run_config_inputs`), so an estimate counts the run ``qtune train`` would
launch; the fields a run config also has take its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qtune.config import FOUR_BIT, KBIT, DataConfig, LoraSettings, Quant, QuantConfig, TrainConfig
from qtune.units import GIB

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

NF4_BLOCKSIZE = 64
"""bitsandbytes' default 4-bit block size: one absmax constant per 64 weights (QLoRA paper, section 3)."""
NESTED_BLOCKSIZE = 256
"""Double quantization: the 8-bit absmax constants are themselves quantized in blocks of 256 with one fp32 scale
each (QLoRA paper, section 3 "Double Quantization"; bitsandbytes ``quantize_4bit(compress_statistics=True)``)."""

BNB_OPTIM_BLOCKSIZE = 256
"""bitsandbytes 8-bit optimizers (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): each of the
two Adam states is stored as uint8 with one fp32 absmax per block of values. The paper used blocks of 2048; the
bitsandbytes release qtune pins (0.50) uses 256 (``Optimizer2State.init_state``: ``blocksize = 256``)."""
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes 8-bit optimizers keep fp32 states for tensors of fewer elements (``min_8bit_size``, default 4096)."""
BNB_QMAP_BYTES = 2 * 256 * 4
"""The two 256-entry fp32 quantization maps (signed and unsigned dynamic maps) an 8-bit optimizer holds once."""
BNB_PAGED_MIN_SIZE = 100_000
"""bitsandbytes paged optimizers put the states of tensors of at least this many elements in CUDA unified memory
(``Optimizer8bit.get_state_buffer``: ``p.numel() < 1e5`` stays an ordinary tensor)."""

CPU_RUNTIME_BYTES = int(0.53 * GIB)
"""Resident set size of a ``qtune train`` process before the model loads: Python with torch, transformers, peft,
datasets and bitsandbytes imported (0.47 GiB), the tokenizer and the prepared splits (0.06 GiB); measured with
``getrusage`` on the build machine (Python 3.11, torch 2.13 CPU, SmolLM2's tokenizer)."""

ALLOCATOR_OVERHEAD = 0.05
"""Reserved/allocated ratio minus one for PyTorch's caching allocator, a heuristic: blocks are rounded up (512 B,
2 MiB segments for large blocks) and freed blocks are kept for reuse (PyTorch docs, "CUDA semantics: memory
management"). Reported apart; not part of ``peak_gib``."""

Device = Literal["cuda", "cpu"]
"""Where the estimate is for: cuda (peak allocated) or cpu (peak resident set size)."""
Strategy = Literal["ddp", "fsdp"]
"""Data parallelism over ``world_size`` GPUs: ddp (replicated model) or fsdp (sharded)."""


def _default(section, name: str):
    """The default of a :class:`qtune.config.RunConfig` field, so TrainShape cannot drift from it."""
    return section.model_fields[name].default


def effective_optim(cfg) -> str:
    """The optimizer a run of ``cfg`` trains with: ``train.optim``, except that LoRA+ (``lora.loraplus_lr_ratio``)
    builds PEFT's ``create_loraplus_optimizer`` over ``torch.optim.AdamW`` (:func:`qtune.model.adapters.
    loraplus_optimizer`), which the Trainer uses instead of ``train.optim``."""
    return "adamw_torch" if cfg.lora.loraplus_lr_ratio is not None else cfg.train.optim


@dataclass(frozen=True)
class TrainShape:
    """What the estimate depends on besides the model config; build it with :meth:`from_config`.

    The fields a :class:`qtune.config.RunConfig` also has take the run config's defaults (read from the config
    classes, not restated here); the others describe where the run goes.

    Attributes:
        quant: none (fp32), fp16, bf16, int8, nf4 or fp4 (``quant.quant``).
        double_quant: 4-bit only; quantize the quantization constants too (``quant.double_quant``).
        compute_dtype: auto (bfloat16 on cuda, float32 on cpu, as :func:`qtune.model.quantize.compute_dtype`),
            float32, float16 or bfloat16 (``quant.compute_dtype``).
        r: LoRA rank (``lora.r``); 0 means full fine-tuning (every parameter trainable; needs a 16/32-bit base),
            which a run config cannot ask for.
        target_modules: PEFT target modules, "all-linear" or a tuple of names (``lora.target_modules``).
        use_dora: DoRA magnitude vectors (PEFT ``use_dora``); counted in the trainable parameters.
        lora_dropout: dropout on the LoRA input; > 0 keeps one dropped copy of each adapted layer's input.
        optim: transformers' optimizer name (``train.optim``, or adamw_torch under LoRA+, :func:`effective_optim`):
            adamw_torch / adamw_torch_fused (two states per trainable parameter in its dtype), adamw_8bit (two
            8-bit states + block-wise fp32 absmax, bitsandbytes) or paged_adamw_8bit (the same in CUDA unified
            memory for large tensors).
        batch_size: sequences per forward pass (micro-batch, ``train.batch_size``).
        seq_len: tokens per sequence (``data.max_length``, or the longest training sample).
        gradient_checkpointing: keep only each decoder layer's input and recompute the rest in backward.
        offload_activations: with checkpointing on cuda, those layer inputs live in pinned CPU memory.
        upcast_frozen: on a quantized base, PEFT's ``prepare_model_for_kbit_training`` casts the 16-bit
            embeddings, norms and LM head to fp32 (``train.upcast_frozen``).
        device: cuda (peak allocated) or cpu (peak resident set size, with the runtime term).
        world_size: data-parallel processes (GPUs); the estimate is per GPU.
        strategy: ddp (every GPU holds the whole model, plus DDP's gradient buckets) or fsdp (weights, gradients
            and optimizer states sharded over ``world_size``, one decoder layer gathered at a time).
        logit_fraction: share of the b x s positions whose LM-head logits are computed (1.0: all). qtune's
            ``train.response_logits_only`` computes them only where a label is supervised.
    """

    quant: Quant = _default(QuantConfig, "quant")
    double_quant: bool = _default(QuantConfig, "double_quant")
    compute_dtype: str = _default(QuantConfig, "compute_dtype")
    r: int = _default(LoraSettings, "r")
    target_modules: str | tuple[str, ...] = _default(LoraSettings, "target_modules")
    use_dora: bool = _default(LoraSettings, "use_dora")
    lora_dropout: float = _default(LoraSettings, "lora_dropout")
    optim: str = _default(TrainConfig, "optim")
    batch_size: int = _default(TrainConfig, "batch_size")
    seq_len: int = _default(DataConfig, "max_length")
    gradient_checkpointing: bool = _default(TrainConfig, "gradient_checkpointing")
    offload_activations: bool = _default(TrainConfig, "offload_activations")
    upcast_frozen: bool = _default(TrainConfig, "upcast_frozen")
    device: Device = "cuda"
    world_size: int = 1
    strategy: Strategy = "ddp"
    logit_fraction: float = 1.0

    @classmethod
    def from_config(
        cls,
        cfg,
        seq_len: int | None = None,
        device: Device | None = None,
        supervised_share: float | None = None,
        world_size: int = 1,
        strategy: Strategy = "ddp",
    ) -> TrainShape:
        """The shape of a run of :class:`qtune.config.RunConfig` ``cfg``.

        Args:
            seq_len: tokens per sequence; default ``data.max_length`` (a bound: the longest sample may be shorter).
            device: default cuda when a GPU is visible, else cpu (where ``qtune train`` would run here).
            supervised_share: supervised (response) tokens / all tokens of the training split; with
                ``train.response_logits_only`` the logits term counts that share of the positions. None: every
                position (a bound).
            world_size, strategy: the launcher's process count and data parallelism (a config has neither).
        """
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        tm = cfg.lora.target_modules
        share = 1.0
        if cfg.train.response_logits_only and supervised_share:
            share = min(1.0, supervised_share)
        return cls(
            quant=cfg.quant.quant,
            double_quant=cfg.quant.double_quant,
            compute_dtype=cfg.quant.compute_dtype,
            r=cfg.lora.r,
            target_modules=tm if isinstance(tm, str) else tuple(tm),
            use_dora=cfg.lora.use_dora,
            lora_dropout=cfg.lora.lora_dropout,
            optim=effective_optim(cfg),
            batch_size=cfg.train.batch_size,
            seq_len=seq_len or cfg.data.max_length,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            offload_activations=cfg.train.offload_activations,
            upcast_frozen=cfg.train.upcast_frozen,
            device=device,
            world_size=world_size,
            strategy=strategy,
            logit_fraction=share,
        )

    def compute_bytes(self) -> int:
        """Bytes per element of activations and of the non-quantized weights as loaded."""
        if self.quant == "fp16":
            return 2
        if self.quant == "bf16":
            return 2
        if self.compute_dtype != "auto":
            return _DTYPE_BYTES[self.compute_dtype]
        return 2 if self.device == "cuda" else 4

    def load_bytes(self) -> int:
        """Bytes per element of the non-quantized weights as loaded (fp32 for quant none)."""
        return 4 if self.quant == "none" else self.compute_bytes()

    @property
    def quantized(self) -> bool:
        return self.quant in KBIT

    @property
    def upcast(self) -> bool:
        """PEFT's fp32 upcast of the 16-bit non-quantized parameters applies."""
        return self.quantized and self.load_bytes() < 4 and self.upcast_frozen


@dataclass
class Term:
    """One line of the breakdown: ``bytes`` and where the formula comes from.

    ``in_peak`` False: left out of the peak, for the reason ``why_not_in_peak`` gives."""

    name: str
    bytes: int
    source: str
    in_peak: bool = True
    why_not_in_peak: str = "not concurrent with the larger phase"

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class ModelCounts:
    """Parameter counts of a model config, split the way bitsandbytes treats them.

    Attributes:
        quantizable: (name, out_features, in_features) of each nn.Linear bitsandbytes replaces.
        kept_params: elements of every other parameter (embeddings, lm_head, norms, biases), kept 16/32-bit.
        buffer_bytes: bytes of registered buffers (rotary inv_freq, fp32).
        param_tensors: (elements, belongs to an nn.Embedding) of every parameter tensor, tied ones once: what full
            fine-tuning trains, tensor by tensor (8-bit optimizers treat small and embedding tensors apart).
        trainable: {(rank, target modules, DoRA): trainable tensors as PEFT makes them} filled lazily.
    """

    quantizable: list[tuple[str, int, int]]
    kept_params: int
    quantizable_bias: int
    buffer_bytes: int
    hidden: int
    intermediate: int
    kv_dim: int
    layers: int
    vocab: int
    lm_head_params: int
    config: object = None
    param_tensors: tuple[tuple[int, bool], ...] = ()
    trainable: dict = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return sum(o * i for _, o, i in self.quantizable) + self.quantizable_bias + self.kept_params


def load_model_config(model) -> PretrainedConfig:
    """A transformers ``PretrainedConfig`` from a :class:`qtune.config.ModelConfig` (its revision and remote-code
    switch apply) or a name: a hub id, a directory holding (only) ``config.json``, a .gguf file or the
    ``smollm2-135m-instruct`` alias.

    Raises:
        QtuneError: the path holds no config.json or the config cannot be read.
    """
    from transformers import AutoConfig

    from qtune.config import ModelConfig
    from qtune.errors import QtuneError
    from qtune.model.load import resolve_model

    cfg = model if isinstance(model, ModelConfig) else ModelConfig(name=model)
    path = resolve_model(cfg, require_weights=False)
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise QtuneError(f"{cfg.name}: cannot read the model config ({str(e).splitlines()[0]})") from None


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_model(config, skip_modules: tuple[str, ...] = ()) -> ModelCounts:
    """Count parameters of ``config``'s causal LM on the meta device (no storage).

    ``skip_modules``: names or name suffixes of linear layers also left unquantized (``quant.skip_modules``).

    The linear layers bitsandbytes quantizes are every ``nn.Linear`` except the modules transformers keeps in
    full precision (``get_keys_to_not_convert``: the output embedding / lm_head, tied weights and the last
    module); embeddings and norms are not linear layers and stay 16/32-bit (bitsandbytes docs, "Quantization";
    QLoRA paper, section 4).

    Raises:
        QtuneError: a name of ``skip_modules`` matches no linear layer.
    """
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    model = _meta_model(config)
    from qtune.model.quantize import unmatched_skip_modules

    unmatched = unmatched_skip_modules(model, skip_modules)
    if unmatched:
        from qtune.errors import QtuneError

        raise QtuneError(f"skip modules: {', '.join(map(repr, unmatched))} names no linear layer of the model")
    skip = set(get_keys_to_not_convert(model)) | set(skip_modules)
    quantizable, q_bias, seen = [], 0, set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
            quantizable.append((name, mod.out_features, mod.in_features))
            seen.add(id(mod.weight))
            if mod.bias is not None:
                q_bias += mod.bias.numel()
                seen.add(id(mod.bias))
    kept = sum(p.numel() for p in model.parameters() if id(p) not in seen)  # parameters() dedups tied weights
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    out_emb = model.get_output_embeddings()
    return ModelCounts(
        quantizable=quantizable,
        kept_params=kept,
        quantizable_bias=q_bias,
        buffer_bytes=buffers,
        hidden=h,
        intermediate=getattr(text, "intermediate_size", 4 * h),
        kv_dim=kv * head_dim,
        layers=text.num_hidden_layers,
        vocab=text.vocab_size,
        lm_head_params=out_emb.weight.numel() if out_emb is not None else 0,
        config=config,
        param_tensors=tuple((p.numel(), id(p) in embedding) for p in model.parameters()),
    )


def trainable_tensors(counts: ModelCounts, shape: TrainShape) -> tuple[tuple[int, bool], ...]:
    """(elements, belongs to an nn.Embedding) of each trainable parameter tensor: PEFT's ``LoraConfig`` attached
    to the meta model, or every parameter for full fine-tuning (r = 0).

    LoRA adds r x (in + out) per adapted linear layer (Hu et al. 2021); DoRA adds a magnitude vector of out_features
    (Liu et al. 2024).

    Raises:
        QtuneError: PEFT rejects ``shape.target_modules`` (e.g. a name matching no module).
    """
    if shape.r == 0:
        return counts.param_tensors
    target = shape.target_modules if isinstance(shape.target_modules, str) else tuple(shape.target_modules)
    key = (shape.r, target, shape.use_dora)
    if key not in counts.trainable:
        from peft import LoraConfig, get_peft_model

        conf = LoraConfig(
            r=shape.r,
            lora_alpha=2 * shape.r,
            target_modules=list(target) if isinstance(target, tuple) else target,
            use_dora=shape.use_dora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(_meta_model(counts.config), conf)
        except ValueError as e:
            from qtune.errors import QtuneError

            raise QtuneError(
                f"target modules {list(target) if isinstance(target, tuple) else target}: {str(e).splitlines()[0]}"
            ) from None
        counts.trainable[key] = tuple((p.numel(), False) for p in model.parameters() if p.requires_grad)
    return counts.trainable[key]


def peft_trainable(counts: ModelCounts, shape: TrainShape) -> int:
    """Trainable parameters as PEFT counts them (see :func:`trainable_tensors`)."""
    return sum(n for n, _ in trainable_tensors(counts, shape))


def quantized_weight_bytes(numel: int, quant: Quant) -> int:
    """Storage of one quantized weight matrix: 4-bit packs two values per byte (``Params4bit`` is uint8 of
    ceil(n/2) elements), LLM.int8() keeps one int8 per value (Dettmers et al. 2022)."""
    return (numel + 1) // 2 if quant in FOUR_BIT else numel


def quant_constant_bytes(numel: int, out_features: int, quant: Quant, double_quant: bool) -> int:
    """Quantization constants of one weight matrix, as bitsandbytes stores them in its ``QuantState``.

    4-bit (QLoRA, section 3; bitsandbytes ``quantize_4bit``): one absmax per block of 64, fp32, or with double
    quantization uint8 plus one fp32 scale per 256 absmax values, an fp32 offset and the 256-entry fp32 code of
    the second level; every layer also holds the 16-entry fp32 NF4/FP4 code. That is 0.5 bit per weight without
    and 0.127 bit with double quantization. LLM.int8(): one fp32 scale per output row (``SCB``).
    """
    if quant == "int8":
        return 4 * out_features
    blocks = -(-numel // NF4_BLOCKSIZE)
    code = 16 * 4
    if not double_quant:
        return 4 * blocks + code
    return blocks + 4 * (-(-blocks // NESTED_BLOCKSIZE)) + 4 + 256 * 4 + code


def optimizer_state_bytes(tensors, optim: str, param_bytes: int, device: str = "cuda") -> tuple[int, int]:
    """Adam states of the trainable ``tensors`` ((elements, is an embedding) pairs) under transformers' ``optim``:
    (bytes PyTorch's allocator holds, bytes in CUDA unified memory).

    adamw_torch / adamw_torch_fused: exp_avg and exp_avg_sq per parameter in its dtype (``param_bytes``;
    Loshchilov & Hutter 2019). adamw_8bit (bitsandbytes, Dettmers et al. 2022): both states uint8 with one fp32
    absmax per :data:`BNB_OPTIM_BLOCKSIZE` values each, plus the two quantization maps once; tensors below
    :data:`BNB_MIN_8BIT_SIZE` elements and embeddings (transformers' Trainer registers nn.Embedding weights for
    32-bit states) keep two fp32 states. paged_adamw_8bit: the same, but on cuda the states of tensors of at least
    :data:`BNB_PAGED_MIN_SIZE` elements are paged (``cudaMallocManaged``): outside PyTorch's allocator, moved to CPU
    memory when the GPU runs short. Raises ValueError for an optimizer qtune does not offer.
    """
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * param_bytes * sum(n for n, _ in tensors), 0
    if optim not in ("adamw_8bit", "paged_adamw_8bit"):
        raise ValueError(f"optimizer {optim!r} is not modelled")
    paged = optim == "paged_adamw_8bit" and device == "cuda"
    allocated = managed = 0
    eight_bit = False
    for n, is_embedding in tensors:
        if n < BNB_MIN_8BIT_SIZE or is_embedding:
            states = 2 * 4 * n
        else:
            states = 2 * n
            allocated += 2 * 4 * -(-n // BNB_OPTIM_BLOCKSIZE)  # absmax1, absmax2: ordinary tensors
            eight_bit = True
        if paged and n >= BNB_PAGED_MIN_SIZE:
            managed += states
        else:
            allocated += states
    return allocated + (BNB_QMAP_BYTES if eight_bit else 0), managed


@dataclass
class MemoryEstimate:
    """Breakdown of predicted peak training memory; ``peak_bytes`` sums the terms with ``in_peak``."""

    shape: TrainShape
    terms: list[Term]
    trainable_params: int
    total_params: int

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.in_peak)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    @property
    def peak_reserved_gib(self) -> float:
        """Predicted peak reserved by PyTorch's CUDA caching allocator: ``peak_gib`` plus
        :data:`ALLOCATOR_OVERHEAD`; on a CPU (peak RSS, no caching allocator) equal to ``peak_gib``."""
        return self.peak_gib * (1 + ALLOCATOR_OVERHEAD) if self.shape.device == "cuda" else self.peak_gib

    def to_dict(self) -> dict:
        """JSON-ready: ``peak_gib`` (predicted peak allocated, or peak RSS on CPU), each term in GiB, inputs."""
        return {
            "peak_gib": round(self.peak_gib, 4),
            "peak_reserved_gib": round(self.peak_reserved_gib, 4),
            "terms_gib": {t.name: round(t.gib, 4) for t in self.terms},
            "not_in_peak": [t.name for t in self.terms if not t.in_peak],
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "inputs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.shape.__dict__.items()},
        }

    def table(self) -> str:
        """The breakdown as aligned text lines (GiB), sources included."""
        rows = [f"{'term':<22} {'GiB':>9}  source"]
        for t in self.terms:
            mark = "" if t.in_peak else f" ({t.why_not_in_peak}; not in peak)"
            rows.append(f"{t.name:<22} {t.gib:>9.3f}  {t.source}{mark}")
        rows.append(
            f"{'peak':<22} {self.peak_gib:>9.3f}  {'peak allocated' if self.shape.device == 'cuda' else 'peak RSS'}"
        )
        if self.shape.device == "cuda":
            rows.append(
                f"{'peak reserved':<22} {self.peak_reserved_gib:>9.3f}  peak allocated + "
                f"{ALLOCATOR_OVERHEAD:.0%} caching-allocator overhead (heuristic); what nvidia-smi shows"
            )
        return "\n".join(rows)


def _layer_activation_bytes(c: ModelCounts, s: TrainShape, e: int, er: int) -> int:
    """Bytes per token that one LLaMA decoder layer saves for its backward pass.

    Adapted from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    section 4.1, 34sbh + 5as^2b per layer for GPT with 16-bit activations) to LLaMA: RMSNorm computed in fp32
    (HF ``LlamaRMSNorm``: 8h bytes with a 32-bit residual, 6h with 16-bit), inputs of q/k/v, o and gate/up
    projections (3eh), RoPE on q and k (2e(h + kv)), the SDPA/flash kernel's q, k, v and output (e(2h + 2kv),
    no s^2 term as the attention matrix is never stored, Dao et al. 2022), SwiGLU (4ei: gate, SiLU(gate), up,
    their product) and, with LoRA dropout, one dropped copy plus a 1-byte mask of each adapted layer's input.
    """
    h, kv, i = c.hidden, c.kv_dim, c.intermediate
    norm = 8 * h if er == 4 else 6 * h
    per = 2 * norm + e * (3 * h + 2 * (h + kv) + 2 * h + 2 * kv + 4 * i)
    if s.r > 0 and s.lora_dropout > 0:
        layer_inputs = [inp for name, _, inp in c.quantizable if ".layers.0." in name]
        per += (e + 1) * sum(layer_inputs)
    return per


def _check_shape(s: TrainShape) -> None:
    from qtune.errors import QtuneError

    if s.r == 0 and s.quantized:
        raise QtuneError(f"r=0 (full fine-tuning) needs a 16/32-bit base, not {s.quant}")
    if s.batch_size < 1 or s.seq_len < 1:
        raise QtuneError("batch size and sequence length must be positive")
    if s.world_size < 1:
        raise QtuneError(f"world size must be at least 1, got {s.world_size}")


def _weight_terms(c: ModelCounts, s: TrainShape) -> list[Term]:
    """The frozen base: weights and buffers as loaded, quantization constants, PEFT's fp32 upcast."""
    load = s.load_bytes()
    kept = c.kept_params + c.quantizable_bias
    if s.quantized:
        qweights = sum(quantized_weight_bytes(o * i, s.quant) for _, o, i in c.quantizable)
        weights = qweights + kept * load + c.buffer_bytes
        constants = sum(quant_constant_bytes(o * i, o, s.quant, s.double_quant) for _, o, i in c.quantizable)
    else:
        weights = (sum(o * i for _, o, i in c.quantizable) + kept) * load + c.buffer_bytes
        constants = 0
    return [
        Term(
            "frozen_weights",
            weights,
            "parameters + buffers after load, as get_memory_footprint(): bitsandbytes "
            "packs 4-bit weights two per byte, int8 one per byte; embeddings, lm_head and norms stay 16/32-bit",
        ),
        Term(
            "quant_constants",
            constants,
            "bitsandbytes QuantState: absmax per 64 weights, fp32 or 8-bit + fp32 "
            "per 256 with double quantization (QLoRA sec. 3); int8: fp32 per row (LLM.int8())",
        ),
        Term(
            "kbit_fp32_upcast",
            kept * (4 - load) if s.upcast else 0,
            "PEFT prepare_model_for_kbit_training casts "
            "the non-quantized 16-bit parameters (embeddings, lm_head, norms) to fp32",
        ),
    ]


_OPTIMIZER_SOURCES = {
    "adamw_torch": "AdamW: exp_avg and exp_avg_sq per trainable parameter (Loshchilov & Hutter 2019; 4 x 28 GB = "
    "112 GB for 7B fp32 full fine-tuning with grads)",
    "adamw_8bit": "bitsandbytes 8-bit AdamW: two uint8 states + fp32 absmax per 256 values (Dettmers et al. 2022, "
    "block-wise quantization); fp32 states for tensors under 4096 elements and embeddings",
}


def _training_state_terms(c: ModelCounts, s: TrainShape) -> tuple[list[Term], int, int]:
    """Trainable parameters, their gradients and the optimizer states: (terms, trainable count, gradient bytes)."""
    tensors = trainable_tensors(c, s)
    trainable = sum(n for n, _ in tensors)
    p_bytes = s.load_bytes() if s.r == 0 else 4  # PEFT keeps adapter weights fp32 (autocast_adapter_dtype)
    allocated, managed = optimizer_state_bytes(tensors, s.optim, p_bytes, s.device)
    source = _OPTIMIZER_SOURCES["adamw_8bit" if s.optim.endswith("8bit") else "adamw_torch"]
    terms = [
        Term(
            "lora_params",
            0 if s.r == 0 else trainable * 4,
            "trainable LoRA (and DoRA) parameters as PEFT "
            "counts them, fp32; 0 for full fine-tuning (they are the frozen_weights term)",
        ),
        Term("gradients", trainable * p_bytes, "one gradient per trainable parameter, in its dtype"),
        Term("optimizer_states", allocated, source),
    ]
    if s.optim.startswith("paged_"):
        terms.append(
            Term(
                "paged_optimizer_states",
                managed,
                "bitsandbytes paged optimizer: the 8-bit states of "
                "tensors of 1e5 elements or more in CUDA unified memory (cudaMallocManaged)",
                in_peak=False,
                why_not_in_peak="outside PyTorch's allocator; paged to CPU memory when the GPU runs short",
            )
        )
    return terms, trainable, trainable * p_bytes


def _activation_terms(c: ModelCounts, s: TrainShape) -> tuple[list[Term], int]:
    """Tensors saved for the backward pass and autocast's weight copies: (terms, one layer's backward workspace)."""
    e, load = s.compute_bytes(), s.load_bytes()
    tokens = s.batch_size * s.seq_len
    er = 4 if s.upcast or load == 4 else e  # the residual stream follows the embedding's dtype
    layer = _layer_activation_bytes(c, s, e, er) * tokens
    if s.gradient_checkpointing:
        saved = c.layers * er * c.hidden * tokens
        saved_src = "gradient checkpointing keeps each decoder layer's input (Chen et al. 2016): L x b x s x h"
        workspace = layer
    else:
        saved = c.layers * layer
        saved_src = (
            "every layer's saved tensors (Korthikanti et al. 2022, adapted to LLaMA; see _layer_activation_bytes)"
        )
        workspace = 0
    # Backward of one layer: gradients of its largest activations, and a 4-bit weight dequantized to compute dtype.
    workspace += 2 * e * max(c.hidden, c.intermediate) * tokens
    if s.quantized and s.quant != "int8":
        workspace += e * max(o * i for _, o, i in c.quantizable)
    if s.offload_activations and s.gradient_checkpointing and s.device == "cuda":
        terms = [
            Term("activations", 0, "the checkpointed layer inputs are offloaded (train.offload_activations)"),
            Term(
                "offloaded_activations",
                saved,
                saved_src + "; held in pinned CPU memory (torch.autograd.graph.save_on_cpu)",
                in_peak=False,
                why_not_in_peak="in CPU memory, not on the GPU",
            ),
        ]
    else:
        terms = [Term("activations", saved, saved_src)]
    casts = 0
    if e < 4 and s.device == "cuda":
        if s.upcast:  # lm_head upcast to fp32, cast back to 16-bit by autocast
            casts = c.lm_head_params * e
        elif s.quant == "none" and s.r == 0:  # autocast caches a 16-bit copy of each trainable fp32 weight
            casts = (sum(o * i for _, o, i in c.quantizable) + c.kept_params + c.quantizable_bias) * e
    terms.append(
        Term(
            "autocast_copies",
            casts,
            "torch.autocast keeps 16-bit copies of fp32 weights used in "
            "matmuls for the backward pass (PyTorch AMP docs)",
        )
    )
    return terms, workspace


def _loss_terms(c: ModelCounts, s: TrainShape, workspace: int) -> list[Term]:
    """The logits/loss phase and one layer's backward workspace: only the larger of the two is in the peak."""
    tokens = s.batch_size * s.seq_len
    logits = int(12 * min(1.0, s.logit_fraction) * tokens * c.vocab)
    logit_src = (
        "logits + fp32 upcast + log-softmax in forward, then saved log-softmax, its gradient and the "
        "logits' gradient in fp32 (transformers ForCausalLMLoss): 12 bytes x positions x V, positions = "
        + ("b x s" if s.logit_fraction >= 1 else "supervised tokens only (response-only logits)")
    )
    return [
        Term("logits_loss", logits, logit_src, in_peak=logits >= workspace),
        Term(
            "layer_workspace",
            workspace,
            "backward of one decoder layer: recomputed activations under "
            "checkpointing, activation gradients, one dequantized 4-bit weight (QLoRA)",
            in_peak=workspace > logits,
        ),
    ]


def _cpu_terms(c: ModelCounts, s: TrainShape) -> list[Term]:
    """Peak RSS only: the checkpoint pages a quantized load leaves mapped, and the Python runtime."""
    ckpt = 0
    if s.quantized:
        dtype = str(getattr(c.config, "dtype", None) or "float32").removeprefix("torch.")
        ckpt = sum(o * i for _, o, i in c.quantizable) * _DTYPE_BYTES.get(dtype, 4)
    return [
        Term(
            "checkpoint_pages",
            ckpt,
            "CPU: transformers memory-maps the safetensors file and keeps the mapping "
            "alive; the original weights of the quantized layers were read through it, so their pages stay "
            "resident (SmolLM2-135M: 0.396 GiB measured in /proc/self/smaps, 0.396 predicted)",
        ),
        Term(
            "runtime",
            CPU_RUNTIME_BYTES,
            "Python + torch/transformers/peft/datasets, tokenizer and splits (measured RSS before the model loads)",
        ),
    ]


def estimate(counts: ModelCounts, s: TrainShape) -> MemoryEstimate:
    """Predict peak training memory for model ``counts`` under ``s``; see the module docstring for the model.

    Raises:
        QtuneError: full fine-tuning (r = 0) of a quantized base, a non-positive batch/sequence length or world
            size, or target modules PEFT rejects.
    """
    _check_shape(s)
    terms = _weight_terms(counts, s)
    state_terms, trainable, grad_bytes = _training_state_terms(counts, s)
    activation_terms, workspace = _activation_terms(counts, s)
    terms += state_terms + activation_terms + _loss_terms(counts, s, workspace)
    if s.world_size > 1:
        _distribute(terms, counts, s, grad_bytes)
    if s.device == "cpu":
        terms += _cpu_terms(counts, s)
    return MemoryEstimate(s, terms, trainable, counts.total_params)


def _distribute(terms: list[Term], counts: ModelCounts, s: TrainShape, grad_bytes: int) -> None:
    """Per-GPU terms under data parallelism, changed in place.

    DDP (PyTorch DDP notes): each GPU keeps the whole model and allreduces gradients through buckets that hold a
    second copy of them. FSDP full sharding (Zhao et al. 2023, "PyTorch FSDP"): parameters, gradients and
    optimizer states are divided over the ``world_size`` ranks; forward and backward gather one wrapped unit (a
    decoder layer) at a time, so one layer's full parameters are resident on top of the shards.
    """
    n = s.world_size
    if s.strategy == "ddp":
        terms.append(
            Term(
                "ddp_buckets",
                grad_bytes,
                "DDP gradient buckets: a second copy of the gradients, "
                "allreduced across ranks (PyTorch DistributedDataParallel notes)",
            )
        )
        return
    sharded = {
        "frozen_weights",
        "quant_constants",
        "kbit_fp32_upcast",
        "lora_params",
        "gradients",
        "optimizer_states",
        "paged_optimizer_states",
    }
    layer_bytes = 0
    for t in terms:
        if t.name in sharded:
            layer_bytes += t.bytes // max(counts.layers, 1) if t.name in ("frozen_weights", "lora_params") else 0
            t.bytes = -(-t.bytes // n)
            t.source += f"; FSDP: sharded over {n} ranks"
    terms.append(
        Term(
            "fsdp_gathered_layer",
            layer_bytes,
            "FSDP all-gathers one decoder layer's parameters for its "
            "forward and backward (Zhao et al. 2023); approximated as 1/L of the frozen + LoRA weights",
        )
    )


def fit(counts: ModelCounts, s: TrainShape, budget_gib: float, max_seq_len: int | None = None) -> dict:
    """Largest micro-batch that fits ``budget_gib`` at ``s.seq_len``, and at each power-of-two sequence length.

    "Fits" means the predicted peak *reserved* memory (:attr:`MemoryEstimate.peak_reserved_gib`: allocated plus the
    caching allocator's overhead on CUDA) is at most ``budget_gib``, so the allocator's headroom is left.

    Returns:
        {"budget_gib", "seq_len", "max_batch_size" (0: not even batch 1 fits), "table": [{seq_len, max_batch_size,
        peak_gib}]}; the table stops at ``max_seq_len`` (the model's context) when given.
    """
    from dataclasses import replace

    def largest(seq: int) -> tuple[int, float]:
        def peak(b: int) -> float:
            return estimate(counts, replace(s, batch_size=b, seq_len=seq)).peak_reserved_gib

        if peak(1) > budget_gib:
            return 0, peak(1)
        lo, hi = 1, 2
        while peak(hi) <= budget_gib and hi < 1 << 20:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if peak(mid) <= budget_gib else (lo, mid)
        return lo, peak(lo)

    b, p = largest(s.seq_len)
    table = []
    seq = 128
    while seq <= (max_seq_len or 8192) and seq <= 1 << 17:
        mb, mp = largest(seq)
        table.append({"seq_len": seq, "max_batch_size": mb, "tokens": mb * seq, "peak_gib": round(mp, 3)})
        seq *= 2
    return {
        "budget_gib": budget_gib,
        "seq_len": s.seq_len,
        "max_batch_size": b,
        "peak_gib": round(p, 3),
        "table": table,
    }


def training_split_stats(train) -> tuple[int, float]:
    """(tokens of the longest sample, supervised tokens / all tokens) of a tokenized training split (columns
    ``input_ids`` and ``labels``, -100 marking unsupervised positions): the ``seq_len`` and ``supervised_share``
    of :meth:`TrainShape.from_config` for a run on that split."""
    total = sum(len(x) for x in train["input_ids"])
    supervised = sum(sum(1 for t in lab if t != -100) for lab in train["labels"])
    return max(len(x) for x in train["input_ids"]), supervised / max(total, 1)


def prepared_split_stats(cfg) -> tuple[int, float]:
    """:func:`training_split_stats` of the training split ``qtune train`` would prepare for ``cfg``: the data is
    read, cleaned, tokenized with the model's tokenizer and split as in training, in a temporary directory that is
    removed afterwards. The split is deterministic (``data.seed``), so a run of ``cfg`` trains on the same one.

    Raises:
        QtuneError: the model's tokenizer or the data cannot be loaded (see
            :func:`qtune.data.prepare.prepare_dataset`).
    """
    import tempfile

    from qtune.data.prepare import prepare_dataset
    from qtune.model.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.model, require_weights=False), cfg.model)
    with tempfile.TemporaryDirectory(prefix="qtune-estimate-") as tmp:
        splits, _ = prepare_dataset(cfg.data, tokenizer, tmp)
        return training_split_stats(splits["train"])


def run_config_inputs(
    cfg,
    seq_len: int | None = None,
    device: Device | None = None,
    supervised_share: float | None = None,
    world_size: int = 1,
    strategy: Strategy = "ddp",
) -> tuple[ModelCounts, TrainShape]:
    """Model counts and training shape of a :class:`qtune.config.RunConfig`: the model config as ``cfg.model``
    names it (no weights), counted with ``quant.skip_modules``, and :meth:`TrainShape.from_config` (see there for
    the arguments).

    Raises:
        QtuneError: the model config cannot be read, or a skip module names no linear layer.
    """
    shape = TrainShape.from_config(cfg, seq_len, device, supervised_share, world_size, strategy)
    return count_model(load_model_config(cfg.model), tuple(cfg.quant.skip_modules)), shape


def estimate_run_config(
    cfg,
    seq_len: int | None = None,
    device: Device | None = None,
    supervised_share: float | None = None,
    world_size: int = 1,
    strategy: Strategy = "ddp",
) -> MemoryEstimate:
    """Estimate for a :class:`qtune.config.RunConfig`; see :func:`run_config_inputs`. ``qtune estimate --config``
    and ``qtune sweep`` both call this, so they print and record the same breakdown for the same inputs."""
    return estimate(*run_config_inputs(cfg, seq_len, device, supervised_share, world_size, strategy))
