"""Where NF4 loses quality, before any training: validation loss of a model whose linear layers are replaced by
their NF4 round trip (bitsandbytes ``quantize_4bit`` then ``dequantize_4bit``, the exact weights a 4-bit load
computes with), with chosen layers left unquantized and with LoftQ's rank-r correction added.

    python bench/quant_sensitivity.py --run runs/demo                  # modules, layers, LoftQ ranks
    python bench/quant_sensitivity.py --run runs/demo --only loftq-iterations

The validation rows are the run's own (``RUN/data``), the loss is qtune's token-weighted response loss
(:func:`qtune.evaluate.perplexity.split_loss`), so the figures compare with ``qtune eval``'s. Each line is one
full evaluation (about 16 s for SmolLM2-135M's 101 rows on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def nf4_round_trip(w: torch.Tensor, double_quant: bool = True) -> torch.Tensor:
    """``dequantize(quantize(w))`` in NF4 with blocks of 64 (bitsandbytes), float32, shape of ``w``."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return F.dequantize_4bit(q, state).float()


def low_rank(e: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation of ``e`` (truncated SVD; Eckart-Young)."""
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a qtune run directory (its model and validation split are used)")
    ap.add_argument("--only", choices=["all", "modules", "layers", "loftq", "loftq-iterations"], default="all")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from qtune.config import load_config
    from qtune.data.prepare import load_splits
    from qtune.data.tokenize import padding_collator
    from qtune.evaluate.perplexity import split_loss
    from qtune.model.load import load_tokenizer, resolve_model
    from qtune.rundir import RunDir

    rd = RunDir(Path(args.run))
    cfg = load_config(rd.config, saved_run=True)
    path = resolve_model(cfg.model)
    collate = padding_collator(load_tokenizer(path, cfg.model))
    val = load_splits(rd.data)["val"]
    val = val.remove_columns([c for c in val.column_names if c == "row"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    original = {n: m.weight.data.clone() for n, m in layers.items()}
    n_layers = model.config.num_hidden_layers

    def evaluate(label: str) -> None:
        t = time.perf_counter()
        loss = split_loss(model, val, collate, cfg.train.eval_batch_size)["loss"]
        print(f"{label:<44} {loss:.4f}   ({time.perf_counter() - t:.0f} s)", flush=True)

    def quantize(keep=lambda name: False, correction=lambda w, d: 0.0, double_quant=True) -> None:
        for name, m in layers.items():
            w = original[name]
            if keep(name):
                m.weight.data = w.clone()
            else:
                d = nf4_round_trip(w, double_quant)
                m.weight.data = d + correction(w, d)

    def layer_index(name: str) -> int:
        return int(name.split(".layers.")[1].split(".")[0])

    print(f"{'weights':<44} {'val loss':>6}")
    run_all = args.only == "all"
    quantize(keep=lambda n: True)
    evaluate("32-bit (no quantization)")
    quantize()
    evaluate("NF4, double quantization")
    if run_all:
        quantize(double_quant=False)
        evaluate("NF4, no double quantization")
    if run_all or args.only == "modules":
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            quantize(keep=lambda n, k=kind: n.endswith(k))
            evaluate(f"NF4 except every {kind}")
    if run_all or args.only == "layers":
        for keep in [(0,), (n_layers - 1,), (0, n_layers - 1)]:
            quantize(keep=lambda n, k=keep: layer_index(n) in k)
            evaluate(f"NF4 except decoder layers {', '.join(map(str, keep))}")
    if run_all or args.only == "loftq":
        for r in (16, 64):
            quantize(correction=lambda w, d, r=r: low_rank(w - d, r))
            evaluate(f"NF4 + LoftQ rank {r} (one SVD)")
    if args.only == "loftq-iterations":
        # LoftQ (Li et al. 2023, Algorithm 1): Q_t = quantize(W - L_{t-1}), L_t = SVD_r(W - dequantize(Q_t)).
        for r in (16, 64):
            for steps in (1, 2, 5):
                for name, m in layers.items():
                    w, lr = original[name], torch.zeros_like(original[name])
                    for _ in range(steps):
                        d = nf4_round_trip(w - lr)
                        lr = low_rank(w - d, r)
                    m.weight.data = d + lr
                evaluate(f"NF4 + LoftQ rank {r}, {steps} iteration(s)")


if __name__ == "__main__":
    main()
