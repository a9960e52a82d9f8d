"""Tokenize (prompt, response) pairs for supervised fine-tuning with the prompt masked out of the loss.

Layout of one sample (length T <= max_length)::

    input_ids: [BOS?] prompt tokens ... | response tokens ... EOS
    labels:    -100   -100          ... | response tokens ... EOS

The prompt and the response are tokenized separately, so the first supervised label is exactly the first token
of the response, and EOS is appended by id (not as text), so it is supervised once even when the pad token is
the EOS token. A BOS is added only if the tokenizer adds one and the prompt text does not already start with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import DataCollatorForSeq2Seq

IGNORE_INDEX = -100
"""Label value ignored by ``torch.nn.functional.cross_entropy`` (its default ``ignore_index``)."""


def encode_prompt(prompt: str, tokenizer) -> list[int]:
    """Prompt token ids, exactly as training saw them: the tokenizer's BOS unless the text already starts with
    it, and never a trailing EOS. Used by training and by generation."""
    bos_text = tokenizer.bos_token or ""
    add_special = not (bos_text and prompt.startswith(bos_text))
    ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id:  # some tokenizers append EOS to every encoding
        ids = ids[:-1]
    return ids


def encode_example(prompt: str, response: str, tokenizer, max_length: int) -> dict[str, list[int]] | None:
    """Token ids and labels for one sample, or None when it does not fit in ``max_length`` tokens.

    Returns:
        {"input_ids": [T], "attention_mask": [T], "labels": [T]} as lists of int, T <= max_length.

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; set one before tokenizing")
    prompt_ids = encode_prompt(prompt, tokenizer)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    if len(prompt_ids) + len(response_ids) > max_length:
        return None
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def longest_token_chars(tokenizer) -> int:
    """Characters in the longest vocabulary entry: a row of more than ``max_length`` x this many characters
    certainly has more than ``max_length`` tokens, so it can be dropped without tokenizing it."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


def padding_collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Pads a list of samples to the batch's longest: input_ids with the pad token, attention_mask with 0,
    labels with -100. Returns tensors of shape [B, T]. (``transformers.DataCollatorForSeq2Seq``.)"""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest", return_tensors="pt")


class ResponseLogitsCollator:
    """Wraps a collator so the model computes LM-head logits only where the next label is supervised.

    Adds two keys that ``LlamaForCausalLM.forward`` (transformers 5) understands: ``logits_to_keep``, the [K]
    sequence positions p (union over the batch) whose next label ``labels[:, p + 1]`` is not -100, and
    ``shift_labels`` [B, K], those next labels. The loss is then the same token-weighted cross-entropy as with
    full logits, without the [B, T, V] logits tensor or the LM-head FLOPs spent on prompt tokens.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        next_labels = batch["labels"][:, 1:]  # [B, T-1]
        keep = (next_labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # [K]
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = next_labels[:, keep]
        return batch


def training_collator(
    tokenizer, packing: bool, response_logits_only: bool
) -> DataCollatorForSeq2Seq | PackingCollator | ResponseLogitsCollator:
    """The collator training uses.

    packing: :class:`PackingCollator` joins a micro-batch into one row [1, sum T_i] with position_ids restarting
    per sample (transformers builds a block-diagonal causal mask from them when no attention_mask is given);
    otherwise :func:`padding_collator`. ``response_logits_only`` wraps it in
    :class:`ResponseLogitsCollator`.
    """
    padded = padding_collator(tokenizer)
    inner = PackingCollator(padded) if packing else padded
    return ResponseLogitsCollator(inner) if response_logits_only else inner


class PackingCollator:
    """Padding-free packing (``transformers.DataCollatorWithFlattening``) for micro-batches of unequal lengths.

    A micro-batch whose samples all have the same length needs no padding; it stays a [B, T] batch, which keeps
    the attention kernels that a plain causal mask allows (a packed row needs a block-diagonal mask).
    """

    def __init__(self, padded):
        from transformers import DataCollatorWithFlattening

        self.padded = padded
        self.flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features):
        if len({len(f["input_ids"]) for f in features}) == 1:
            return self.padded(features)
        return self.flat(features)
