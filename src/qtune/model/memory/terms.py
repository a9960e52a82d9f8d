"""The lines of the breakdown, one builder per group of terms: the frozen base, the training state (trainable
parameters, gradients, optimizer states), the activations, the logits/loss phase, the CPU-only terms and the
per-GPU changes under data parallelism. Every term is built by :func:`term`, which takes the source of its
formula from :data:`SOURCES` and its place outside the peak from :data:`NOT_IN_PEAK`."""

from __future__ import annotations

from dataclasses import dataclass

from qtune.model.memory.counts import ModelCounts, trainable_tensors
from qtune.model.memory.shape import DTYPE_BYTES, TrainShape
from qtune.model.memory.storage import optimizer_state_bytes, quant_constant_bytes, quantized_weight_bytes
from qtune.units import GIB

CPU_RUNTIME_BYTES = int(0.53 * GIB)
"""Resident set size of a ``qtune train`` process before the model loads: Python with torch, transformers, peft,
datasets and bitsandbytes imported (0.47 GiB), the tokenizer and the prepared splits (0.06 GiB); measured with
``getrusage`` on the build machine (Python 3.11, torch 2.13 CPU, SmolLM2's tokenizer)."""


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


SOURCES = {
    "frozen_weights": "parameters + buffers after load, as get_memory_footprint(): bitsandbytes "
    "packs 4-bit weights two per byte, int8 one per byte; embeddings, lm_head and norms stay 16/32-bit",
    "quant_constants": "bitsandbytes QuantState: absmax per 64 weights, fp32 or 8-bit + fp32 "
    "per 256 with double quantization (QLoRA sec. 3); int8: fp32 per row (LLM.int8())",
    "kbit_fp32_upcast": "PEFT prepare_model_for_kbit_training casts "
    "the non-quantized 16-bit parameters (embeddings, lm_head, norms) to fp32",
    "lora_params": "trainable LoRA (and DoRA) parameters as PEFT "
    "counts them, fp32; 0 for full fine-tuning (they are the frozen_weights term)",
    "gradients": "one gradient per trainable parameter, in its dtype",
    "paged_optimizer_states": "bitsandbytes paged optimizer: the 8-bit states of "
    "tensors of 1e5 elements or more in CUDA unified memory (cudaMallocManaged)",
    "autocast_copies": "torch.autocast keeps 16-bit copies of fp32 weights used in "
    "matmuls for the backward pass (PyTorch AMP docs)",
    "layer_workspace": "backward of one decoder layer: recomputed activations under "
    "checkpointing, activation gradients, one dequantized 4-bit weight (QLoRA)",
    "checkpoint_pages": "CPU: transformers memory-maps the safetensors file and keeps the mapping "
    "alive; the original weights of the quantized layers were read through it, so their pages stay "
    "resident (SmolLM2-135M: 0.396 GiB measured in /proc/self/smaps, 0.396 predicted)",
    "runtime": "Python + torch/transformers/peft/datasets, tokenizer and splits (measured RSS before the model loads)",
    "ddp_buckets": "DDP gradient buckets: a second copy of the gradients, "
    "allreduced across ranks (PyTorch DistributedDataParallel notes)",
    "fsdp_gathered_layer": "FSDP all-gathers one decoder layer's parameters for its "
    "forward and backward (Zhao et al. 2023); approximated as 1/L of the frozen + LoRA weights",
}
"""Where the formula of each term with a fixed source comes from, by term name; the builders of the others
(optimizer states, activations, logits/loss) say which variant of the formula applies."""

OPTIMIZER_SOURCES = {
    "adamw_torch": "AdamW: exp_avg and exp_avg_sq per trainable parameter (Loshchilov & Hutter 2019; 4 x 28 GB = "
    "112 GB for 7B fp32 full fine-tuning with grads)",
    "adamw_8bit": "bitsandbytes 8-bit AdamW: two uint8 states + fp32 absmax per 256 values (Dettmers et al. 2022, "
    "block-wise quantization); fp32 states for tensors under 4096 elements and embeddings",
}
"""The source of the ``optimizer_states`` term, by optimizer family (32-bit AdamW or bitsandbytes' 8-bit)."""

NOT_IN_PEAK = {
    "paged_optimizer_states": "outside PyTorch's allocator; paged to CPU memory when the GPU runs short",
    "offloaded_activations": "in CPU memory, not on the GPU",
}
"""Terms that are never part of the peak allocated memory, and why."""


def term(name: str, nbytes: int, source: str | None = None, in_peak: bool = True) -> Term:
    """The term ``name`` of ``nbytes`` bytes; its source is ``source``, else the one :data:`SOURCES` gives ``name``.

    A term :data:`NOT_IN_PEAK` names is left out of the peak for the reason given there; ``in_peak`` False
    leaves any other out as not concurrent with the larger phase (logits/loss against a layer's backward)."""
    src = SOURCES[name] if source is None else source
    if name in NOT_IN_PEAK:
        return Term(name, nbytes, src, in_peak=False, why_not_in_peak=NOT_IN_PEAK[name])
    return Term(name, nbytes, src, in_peak=in_peak)


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


def weight_terms(c: ModelCounts, s: TrainShape) -> list[Term]:
    """The frozen base: weights and buffers as loaded, quantization constants, PEFT's fp32 upcast."""
    load = s.load_bytes()
    kept = c.kept_params + c.quantizable_bias
    if s.quantized:
        qweights = sum(quantized_weight_bytes(o * i, s.quant) for _, o, i in c.quantizable)
        weights = qweights + kept * load + c.buffer_bytes
        constants = sum(quant_constant_bytes(o * i, o, s.quant, s.double_quant) for _, o, i in c.quantizable)
    else:
        weights = (c.quantizable_weights + kept) * load + c.buffer_bytes
        constants = 0
    return [
        term("frozen_weights", weights),
        term("quant_constants", constants),
        term("kbit_fp32_upcast", kept * (4 - load) if s.upcast else 0),
    ]


def training_state_terms(c: ModelCounts, s: TrainShape) -> tuple[list[Term], int, int]:
    """Trainable parameters, their gradients and the optimizer states: (terms, trainable count, gradient bytes)."""
    tensors = trainable_tensors(c, s)
    trainable = sum(n for n, _ in tensors)
    p_bytes = s.load_bytes() if s.r == 0 else 4  # PEFT keeps adapter weights fp32 (autocast_adapter_dtype)
    allocated, managed = optimizer_state_bytes(tensors, s.optim, p_bytes, s.device)
    source = OPTIMIZER_SOURCES["adamw_8bit" if s.optim.endswith("8bit") else "adamw_torch"]
    terms = [
        term("lora_params", 0 if s.r == 0 else trainable * 4),
        term("gradients", trainable * p_bytes),
        term("optimizer_states", allocated, source),
    ]
    if s.optim.startswith("paged_"):
        terms.append(term("paged_optimizer_states", managed))
    return terms, trainable, trainable * p_bytes


def activation_terms(c: ModelCounts, s: TrainShape) -> tuple[list[Term], int]:
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
            term("activations", 0, "the checkpointed layer inputs are offloaded (train.offload_activations)"),
            term(
                "offloaded_activations",
                saved,
                saved_src + "; held in pinned CPU memory (torch.autograd.graph.save_on_cpu)",
            ),
        ]
    else:
        terms = [term("activations", saved, saved_src)]
    casts = 0
    if e < 4 and s.device == "cuda":
        if s.upcast:  # lm_head upcast to fp32, cast back to 16-bit by autocast
            casts = c.lm_head_params * e
        elif s.quant == "none" and s.r == 0:  # autocast caches a 16-bit copy of each trainable fp32 weight
            casts = c.total_params * e
    terms.append(term("autocast_copies", casts))
    return terms, workspace


def loss_terms(c: ModelCounts, s: TrainShape, workspace: int) -> list[Term]:
    """The logits/loss phase and one layer's backward workspace: only the larger of the two is in the peak."""
    tokens = s.batch_size * s.seq_len
    logits = int(12 * min(1.0, s.logit_fraction) * tokens * c.vocab)
    logit_src = (
        "logits + fp32 upcast + log-softmax in forward, then saved log-softmax, its gradient and the "
        "logits' gradient in fp32 (transformers ForCausalLMLoss): 12 bytes x positions x V, positions = "
        + ("b x s" if s.logit_fraction >= 1 else "supervised tokens only (response-only logits)")
    )
    return [
        term("logits_loss", logits, logit_src, in_peak=logits >= workspace),
        term("layer_workspace", workspace, in_peak=workspace > logits),
    ]


def cpu_terms(c: ModelCounts, s: TrainShape) -> list[Term]:
    """Peak RSS only: the checkpoint pages a quantized load leaves mapped, and the Python runtime."""
    ckpt = 0
    if s.quantized:
        dtype = str(getattr(c.config, "dtype", None) or "float32").removeprefix("torch.")
        ckpt = c.quantizable_weights * DTYPE_BYTES.get(dtype, 4)
    return [term("checkpoint_pages", ckpt), term("runtime", CPU_RUNTIME_BYTES)]


def distribute(terms: list[Term], counts: ModelCounts, s: TrainShape, grad_bytes: int) -> None:
    """Per-GPU terms under data parallelism, changed in place.

    DDP (PyTorch DDP notes): each GPU keeps the whole model and allreduces gradients through buckets that hold a
    second copy of them. FSDP full sharding (Zhao et al. 2023, "PyTorch FSDP"): parameters, gradients and
    optimizer states are divided over the ``world_size`` ranks; forward and backward gather one wrapped unit (a
    decoder layer) at a time, so one layer's full parameters are resident on top of the shards.
    """
    n = s.world_size
    if s.strategy == "ddp":
        terms.append(term("ddp_buckets", grad_bytes))
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
    terms.append(term("fsdp_gathered_layer", layer_bytes))
