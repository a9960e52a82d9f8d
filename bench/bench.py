"""Side-by-side benchmark: the stock QLoRA recipe against qtune's training path, one fresh subprocess per run.

The stock recipe is transformers + PEFT + bitsandbytes as their documentation shows it: ``from_pretrained`` with
a ``BitsAndBytesConfig``, ``prepare_model_for_kbit_training`` (fp32 upcast of the frozen non-quantized
parameters, gradient checkpointing), LoRA on all linear layers, padded batches (``DataCollatorForSeq2Seq``),
``Trainer`` with AdamW. qtune's path is ``qtune.train.trainer.build_trainer`` with the config given per row.
Both see the same batches and the same seed.

Modes:
    tiny      a 2-layer LLaMA on CPU, fixed shapes: checks the harness itself in seconds.
    gpu       the LLaMA-2-7B shape (random bf16 weights saved once to /dev/shm) on CUDA: issue 8's rows.
    cpu-real  SmolLM2-135M-Instruct, NF4 r16, batch 4, max length 512, on real CodeAlpaca rows, on CPU.

Each worker prints one JSON line: peak allocated/reserved GiB (CUDA), peak RSS GiB, tokens/s counting every
position of the batch and real tokens/s counting non-padding tokens only, over the timed steps (after warm-up),
and the per-step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qtune.units import GIB  # dependency-free: the stock recipe's workers import nothing else of qtune

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    name: str
    quant: str
    r: int
    seq: int  # tokens per sample (fixed-shape rows); max length for real-data rows
    batch: int
    real_data: bool = False
    warmup: int = 2
    steps: int = 4
    lr_warmup: int = 1  # warmup steps of the cosine schedule
    qtune: dict = field(default_factory=dict)  # qtune config overrides, by section: {"train": {...}, "lora": {...}}
    variants: dict = field(default_factory=dict)  # label -> overrides like ``qtune``: one switch each, run last


GPU_FAST = {"train": {"liger": "on", "optim": "paged_adamw_8bit"}}


def with_train(base: dict, **train) -> dict:
    """``base`` with more train.* overrides."""
    return {**base, "train": {**base.get("train", {}), **train}}


ROWS = {
    "gpu": [
        Row(
            "nf4-r16-512x1",
            "nf4",
            16,
            512,
            1,
            qtune=GPU_FAST,
            variants={
                "no-liger": with_train(GPU_FAST, liger="off"),
                "adamw-torch": with_train(GPU_FAST, optim="adamw_torch"),
                "upcast": with_train(GPU_FAST, upcast_frozen=True),
                "dropout-0.05": {**GPU_FAST, "lora": {"lora_dropout": 0.05}},
            },
        ),
        Row(
            "nf4-r8-1024x4",
            "nf4",
            8,
            1024,
            4,
            qtune=GPU_FAST,
            variants={"no-checkpointing": with_train(GPU_FAST, gradient_checkpointing=False)},
        ),
        Row("bf16-r16-512x1", "bf16", 16, 512, 1, qtune=GPU_FAST),
        Row("int8-r16-512x1", "int8", 16, 512, 1, qtune=GPU_FAST),
        Row(
            "nf4-r8-16384x1",
            "nf4",
            8,
            16384,
            1,
            warmup=1,
            steps=2,
            qtune=with_train(GPU_FAST, offload_activations=True),
        ),
        Row("nf4-r16-codealpaca-b8", "nf4", 16, 512, 8, real_data=True, qtune=GPU_FAST),
    ],
    "tiny": [
        Row("nf4-r16-64x1", "nf4", 16, 64, 1, warmup=1, steps=2),
        Row("nf4-r8-64x4", "nf4", 8, 64, 4, warmup=1, steps=2),
        Row("nf4-r16-codealpaca-b4", "nf4", 16, 128, 4, real_data=True, warmup=1, steps=2),
    ],
    "cpu-real": [
        # "qtune" here turns gradient checkpointing off (fastest; peak RSS 3.9 GiB over 60 steps); bench/RESULTS.md
        # has the rows
        Row(
            "nf4-r16-codealpaca-b4",
            "nf4",
            16,
            512,
            4,
            real_data=True,
            warmup=2,
            steps=58,
            lr_warmup=6,
            qtune=with_train({}, gradient_checkpointing=False),
            # "checkpointing": qtune's defaults as they are (compute_dtype auto: bf16 on a CPU with AMX/AVX512-BF16);
            # "fp32" and "bf16" pin the compute dtype (issue 16's side-by-side rows)
            variants={
                "checkpointing": {},
                "fp32": {"quant": {"compute_dtype": "float32"}},
                "bf16": {"quant": {"compute_dtype": "bfloat16"}},
            },
        ),
    ],
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# ----------------------------------------------------------------------------------------------------------------
# model and data preparation (parent process)


def llama2_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=16384,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def word_level_tokenizer():
    """A minimal tokenizer (pad/bos/eos/unk) so the padding collators work on synthetic token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    return tok


def build_random_model(config, path: Path, device: str) -> None:
    """Random weights (std 0.02) in bf16 saved as safetensors; skipped when already there."""
    import torch
    from transformers import LlamaForCausalLM

    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    word_level_tokenizer().save_pretrained(path)
    del model


def codealpaca_lengths(cache: Path) -> list[list[int]]:
    """(prompt tokens, total tokens) of real CodeAlpaca samples: SmolLM2 tokenizer, Alpaca template, 512 budget.

    Computed with qtune's data stage from ../shared/data where present and cached as JSON, so the GPU machine
    (which has no copy of the data) can read the same distribution.
    """
    path = cache / "codealpaca_lengths.json"
    if path.is_file():
        return json.loads(path.read_text())
    from qtune.config import DataConfig, ModelConfig
    from qtune.data.prepare import prepare_dataset
    from qtune.model.load import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(ModelConfig()), ModelConfig())
    splits, _ = prepare_dataset(DataConfig(max_length=512), tok, cache / "codealpaca")
    lengths = [[lab.count(-100), len(lab)] for lab in splits["train"]["labels"]]
    path.write_text(json.dumps(lengths))
    return lengths


# ----------------------------------------------------------------------------------------------------------------
# worker (one recipe, one row, fresh process)


def synthetic_samples(row: Row, vocab: int, lengths: list[list[int]] | None, n: int, seed: int) -> list[dict]:
    """Token ids drawn at random; fixed-shape rows are fully supervised, real-data rows mask their prompt."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if lengths:
            p, t = lengths[rng.randrange(len(lengths))]
            t = min(t, row.seq)
        else:
            p, t = 1, row.seq
        ids = [1] + [rng.randrange(4, vocab) for _ in range(t - 1)]
        out.append({"input_ids": ids, "attention_mask": [1] * t, "labels": [-100] * p + ids[p:]})
    return out


class Timer:
    """TrainerCallback timing each optimizer step (CUDA-synchronised) and counting its tokens."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        self.warmup, self.times, self.losses = warmup, [], []
        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                _sync()
                timer.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync()
                timer.times.append(time.perf_counter() - timer.t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    timer.losses.append(logs["loss"])

        self.callback = _CB()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class CountingCollator:
    """Records, per batch, all positions (B x T) and the real (non-padding) tokens."""

    def __init__(self, inner):
        self.inner, self.counts = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        real = sum(len(f["input_ids"]) for f in features)
        self.counts.append((batch["input_ids"].numel(), real))
        return batch


def stock_trainer(row: Row, model_dir: str, tokenizer, samples, args):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kw = {"dtype": dtype}
    if row.quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    elif row.quant == "int8":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": "cuda" if cuda else "cpu"}, **kw)
    if row.quant in ("nf4", "int8"):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=row.r, lora_alpha=2 * row.r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    collate = CountingCollator(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding="longest"))
    targs = TrainingArguments(
        output_dir=args.tmp,
        max_steps=row.warmup + row.steps,
        per_device_train_batch_size=row.batch,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=row.lr_warmup,
        optim="adamw_torch",
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    return Trainer(model=model, args=targs, train_dataset=samples, data_collator=collate), collate


def qtune_trainer(row: Row, model_dir: str, tokenizer, samples, args):
    from qtune.config import RunConfig
    from qtune.train.trainer import build_trainer

    overrides = row.variants[args.recipe.split(":", 1)[1]] if ":" in args.recipe else row.qtune
    cfg = RunConfig.model_validate(
        {
            "model": {"name": model_dir},
            "quant": {"quant": row.quant, **overrides.get("quant", {})},
            "lora": {"r": row.r, "lora_alpha": 2 * row.r, **overrides.get("lora", {})},  # qtune's default dropout
            "data": {"max_length": row.seq},
            "train": {
                "max_steps": row.warmup + row.steps,
                "batch_size": row.batch,
                "learning_rate": 2e-4,
                "warmup_steps": row.lr_warmup,
                "seed": 0,
                "save_steps": 0,
                **overrides.get("train", {}),
            },
        }
    )
    trainer = build_trainer(cfg, model_dir, tokenizer, samples, None, Path(args.tmp))
    trainer.data_collator = collate = CountingCollator(trainer.data_collator)
    return trainer, collate


def worker(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    row = Row(**json.loads(args.row))
    lengths = json.loads(Path(args.lengths).read_text()) if row.real_data else None
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = min(len(tokenizer), 32000) if args.mode == "cpu-real" else 32000
    if args.mode == "cpu-real":
        samples = json.loads(Path(args.samples).read_text())
    else:
        samples = synthetic_samples(row, vocab, lengths, n=row.batch * (row.warmup + row.steps) * 2, seed=1)
    build = stock_trainer if args.recipe == "stock" else qtune_trainer
    trainer, collate = build(row, args.model_dir, tokenizer, samples, args)
    timer = Timer(row.warmup)
    trainer.add_callback(timer.callback)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    train_rss = peak_rss_gib()  # before evaluation, whose peak is not training's
    timed = slice(row.warmup, None)
    secs = sum(timer.times[timed])
    positions = sum(c[0] for c in collate.counts[row.warmup : row.warmup + row.steps])
    real = sum(c[1] for c in collate.counts[row.warmup : row.warmup + row.steps])
    out = {
        "row": row.name,
        "recipe": args.recipe,
        "step_s": round(secs / max(row.steps, 1), 4),
        "tokens_per_s": round(positions / secs, 1),
        "real_tokens_per_s": round(real / secs, 1),
        "padding_pct": round(100 * (1 - real / positions), 1) if positions else 0.0,
        "losses": timer.losses,
        "peak_rss_gib": round(train_rss, 3),
    }
    if args.mode == "cpu-real":
        from qtune.data.tokenize import padding_collator
        from qtune.evaluate.perplexity import split_loss

        val = json.loads(Path(args.samples.replace(".json", "_val.json")).read_text())
        out["val_loss"] = round(split_loss(trainer.model, val, padding_collator(tokenizer), 8)["loss"], 4)
    if torch.cuda.is_available():
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    return out


# ----------------------------------------------------------------------------------------------------------------
# driver


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = None
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| row | recipe | peak alloc / reserved GiB | peak RSS GiB | step s | tokens/s | real tokens/s | padding % "
        "| ratio (real tok/s) | first loss | val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stock = {r["row"]: r for r in results if r.get("recipe") == "stock" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['recipe']} | error: {r['error'][:120]} | | | | | | | | |")
            continue
        mem = f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if "peak_allocated_gib" in r else "-"
        base = stock.get(r["row"])
        ratio = f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x" if base else "-"
        first = f"{r['losses'][0]:.4f}" if r["losses"] else "-"
        lines.append(
            f"| {r['row']} | {r['recipe']} | {mem} | {r['peak_rss_gib']:.2f} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['real_tokens_per_s']:.0f} | {r['padding_pct']} | {ratio} | {first} | "
            f"{r.get('val_loss', '-')} |"
        )
    return "\n".join(lines)


def driver(args) -> None:
    import torch

    mode = args.mode
    if mode == "auto":
        mode = "gpu" if torch.cuda.is_available() else "tiny"
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lengths_path = cache / "codealpaca_lengths.json"
    samples_path = cache / "cpu_real_samples.json"
    if mode == "gpu":
        model_dir = Path(os.environ.get("BENCH_MODEL_DIR", "/dev/shm/qtune-llama2-7b-shape"))
        build_random_model(llama2_7b_config(), model_dir, "cuda")
    elif mode == "tiny":
        model_dir = cache / "tiny-llama"
        build_random_model(tiny_config(), model_dir, "cpu")
    else:
        from qtune.config import ModelConfig
        from qtune.model.load import resolve_model

        model_dir = Path(resolve_model(ModelConfig()))
    if not lengths_path.is_file():
        codealpaca_lengths(cache)
    if mode == "cpu-real":
        from datasets import load_from_disk

        splits = load_from_disk(str(cache / "codealpaca" / "splits"))
        keep = ("input_ids", "attention_mask", "labels")
        samples_path.write_text(json.dumps([{k: s[k] for k in keep} for s in splits["train"].shuffle(seed=0)]))
        Path(str(samples_path).replace(".json", "_val.json")).write_text(
            json.dumps([{k: s[k] for k in keep} for s in splits["val"]])
        )
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)

    results = []
    rows = [r for r in ROWS[mode] if not args.rows or r.name in args.rows]
    runs = [(row, recipe) for row in rows for recipe in ("stock", "qtune")]
    runs += [(row, f"qtune:{label}") for row in rows for label in row.variants]
    if args.recipes:
        runs = [(row, recipe) for row, recipe in runs if recipe in args.recipes]
    for row, recipe in runs:
        if time.perf_counter() - t0 > args.budget_s:
            results.append({"row": row.name, "recipe": recipe, "error": "skipped: time budget spent"})
            continue
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--recipe",
            recipe,
            "--mode",
            mode,
            "--row",
            json.dumps(asdict(row)),
            "--model-dir",
            str(model_dir),
            "--lengths",
            str(lengths_path),
            "--samples",
            str(samples_path),
            "--tmp",
            str(cache / "trainer-tmp"),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode == 0 and line:
            res = json.loads(line[-1])
        else:
            tail = proc.stderr.strip().splitlines() or ["no output"]
            res = {"row": row.name, "recipe": recipe, "error": tail[-1]}
            with (out_dir / "errors.log").open("a") as f:
                f.write(f"== {row.name} {recipe}\n" + "\n".join(tail[-40:]) + "\n")
        res["wall_s"] = round(time.perf_counter() - start, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        (out_dir / f"bench-{mode}.json").write_text(json.dumps({"versions": versions(), "results": results}, indent=1))
    md = table(results)
    (out_dir / f"bench-{mode}.md").write_text(md + "\n")
    print(md)
    print(f"total {time.perf_counter() - t0:.0f} s; versions {json.dumps(versions())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["auto", "tiny", "gpu", "cpu-real"], default="auto")
    p.add_argument("--rows", nargs="*", help="run only these rows")
    p.add_argument("--recipes", nargs="*", help="run only these recipes (stock, qtune, qtune:VARIANT)")
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--cache", default=str(HERE.parent / ".bench-cache"))
    p.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("BENCH_BUDGET_S", 3600)),
        help="start no new run after this many seconds (the GPU run uses 380 to end inside 8 minutes)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help="stock, qtune or qtune:VARIANT")
    (
        p.add_argument("--row"),
        p.add_argument("--model-dir"),
        p.add_argument("--lengths"),
        p.add_argument("--samples"),
        p.add_argument("--tmp"),
    )
    args = p.parse_args()
    if args.worker:
        import logging
        import warnings

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        print(json.dumps(worker(args)), flush=True)
    else:
        driver(args)


if __name__ == "__main__":
    main()
