"""Parameter counts of a model config, on PyTorch's ``meta`` device (shapes only, no storage): what bitsandbytes
quantizes, what stays 16/32-bit, and what PEFT makes trainable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from qtune.model.memory.shape import TrainShape


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
    def quantizable_weights(self) -> int:
        """Elements of the weight matrices bitsandbytes quantizes (``quantizable``), biases not included."""
        return sum(o * i for _, o, i in self.quantizable)

    @property
    def total_params(self) -> int:
        return self.quantizable_weights + self.quantizable_bias + self.kept_params


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
