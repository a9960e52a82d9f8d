"""Greedy generation speed of SmolLM2-135M-Instruct NF4 + a LoRA r16 adapter, fp32 against bf16 compute.

Each row loads the base anew with ``quant.compute_dtype`` float32 or bfloat16, wraps it in a fresh LoRA r16 on all
linear layers (B = 0, so the cost is an adapter's without changing the answers), and decodes exactly
``--new-tokens`` tokens greedily (``min_new_tokens`` = ``max_new_tokens``) for the first ``batch`` HumanEval
prompts, left-padded. Two inference paths:

- ``bnb``: the 4-bit bitsandbytes layers as loaded (``qtune generate`` / ``chat`` / ``serve``);
- ``dequantized``: :func:`qtune.model.quantize.dequantize_for_inference` first (HumanEval's path).

tokens/s counts generated tokens of all rows (batch x new tokens) over the wall time of ``generate`` after one
warm-up call. Run with nothing else on the machine:

    PYTHONPATH=src .venv/bin/python bench/generation.py [--new-tokens 64] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qtune.config import RunConfig
from qtune.evaluate.humaneval import load_problems
from qtune.model.adapters import peft_model
from qtune.model.load import load_model, load_tokenizer, resolve_model
from qtune.model.quantize import dequantize_for_inference


def one_row(dtype: str, path: str, batch: int, new_tokens: int, prompts: list[str]) -> dict:
    """Load, (optionally) dequantize, time one greedy ``generate`` of ``batch`` prompts; returns the row."""
    cfg = RunConfig.model_validate({"quant": {"quant": "nf4", "compute_dtype": dtype}})
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir, cfg.model)
    tokenizer.padding_side = "left"
    model = peft_model(load_model(model_dir, cfg.model, cfg.quant), cfg.lora)
    model.eval()
    if path == "dequantized":
        dequantize_for_inference(model)
    enc = tokenizer(prompts[:batch], return_tensors="pt", padding=True)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        model.generate(**enc, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = model.generate(**enc, **kwargs)
        wall = time.perf_counter() - start
    generated = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    return {
        "compute_dtype": dtype,
        "path": path,
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_tokens": int(enc["attention_mask"].sum()),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(generated / wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--paths", nargs="+", default=["bnb", "dequantized"], choices=["bnb", "dequantized"])
    p.add_argument("--problems", default=None, help="HumanEval jsonl (default: qtune's, ../shared/data)")
    args = p.parse_args()
    problems = load_problems(args.problems)
    prompts = [q["prompt"] for q in list(problems.values())[: max(args.batches)]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for path in args.paths:
        for batch in args.batches:
            for dtype in ("float32", "bfloat16"):
                rows.append(one_row(dtype, path, batch, args.new_tokens, prompts))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| path | batch | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 |\n|---|---|---|---|---|")
    for path in args.paths:
        for batch in args.batches:
            f32, b16 = (r for r in rows if r["path"] == path and r["batch"] == batch)
            ratio = b16["tokens_per_s"] / f32["tokens_per_s"]
            print(f"| {path} | {batch} | {f32['tokens_per_s']} | {b16['tokens_per_s']} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
