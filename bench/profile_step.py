"""Where one training step's time goes: torch.profiler over one step of the demo recipe (configs/demo.yaml).

Trains the demo run for ``--steps`` steps (default 4) into a temporary directory with ``quant.compute_dtype`` set
to ``--compute-dtype``, profiles the last step (CPU activities, self time of every operator) and prints the self
time grouped into matmul, 4-bit dequantize, attention, optimizer, data, dtype casts and the rest (elementwise,
norms, autograd bookkeeping), in seconds and as a share of the step:

    PYTHONPATH=src .venv/bin/python bench/profile_step.py --compute-dtype bfloat16 [--top 15]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from qtune.config import load_config
from qtune.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]

GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("4-bit dequantize", ("bitsandbytes::dequantize", "bitsandbytes::gemm_4bit", "bitsandbytes::")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("optimizer", ("Optimizer.", "aten::_foreach", "aten::addcdiv", "aten::addcmul", "aten::lerp", "aten::sqrt")),
    ("data", ("DataLoader", "enumerate(DataLoader)")),
    ("dtype casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
)


def group_of(name: str) -> str:
    """The group an operator's self time is counted in (first matching prefix or substring)."""
    for group, keys in GROUPS:
        if any(name.startswith(k) or k in name for k in keys):
            return group
    return "other (elementwise, norms, autograd)"


class ProfileLastStep(TrainerCallback):
    """Profiles the step whose number is ``step`` (1-based) and keeps the profiler's key averages."""

    def __init__(self, step: int):
        self.step, self.prof, self.averages = step, None, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == self.step:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None and state.global_step == self.step:
            self.prof.__exit__(None, None, None)
            self.averages = self.prof.key_averages()
            self.prof = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top", type=int, default=12, help="also print the N operators with the most self time")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            ROOT / "configs" / "demo.yaml",
            [
                f"quant.compute_dtype={args.compute_dtype}",
                f"train.max_steps={args.steps}",
                "train.warmup_steps=1",
                "train.eval_at_end=false",
                f"train.output_dir={tmp}/run",
            ],
        )
        probe = ProfileLastStep(args.steps)
        train(cfg, callbacks=(probe,))
    assert probe.averages is not None, "the profiled step did not run"
    events = [e for e in probe.averages if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
    print(f"\nstep {args.steps}, compute_dtype {args.compute_dtype}: {total:.3f} s of operator self time")
    print("| part | s | share |\n|---|---|---|")
    for name, sec in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {sec:.3f} | {100 * sec / total:.1f}% |")
    print(f"\ntop {args.top} operators by self time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {e.key[:60]:60s} {e.self_cpu_time_total / 1e6:7.3f} s  {e.count:6d} calls")


if __name__ == "__main__":
    main()
