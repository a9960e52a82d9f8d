"""``qtune estimate``: peak training memory, term by term, from a model's config alone (no weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qtune.cli.common import RemoteCodeOpt, SetOpt, app, fail, quiet_libraries, remote_code
from qtune.config import QuantConfig, TrainConfig
from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.model.memory import Device, Strategy

_ESTIMATE_FLAGS = {
    "model.name": "model",
    "quant.quant": "quant",
    "quant.double_quant": "double-quant",
    "quant.compute_dtype": "compute-dtype",
    "quant.skip_modules": "skip-modules",
    "lora.r": "r",
    "lora.target_modules": "target-modules",
    "lora.use_dora": "dora",
    "lora.lora_dropout": "lora-dropout",
    "train.optim": "optim",
    "train.batch_size": "batch-size",
    "train.gradient_checkpointing": "gradient-checkpointing",
    "train.upcast_frozen": "upcast-frozen",
}
"""Config field -> ``qtune estimate`` flag: each flag is a shorthand for ``--set FIELD=VALUE``."""


def _choices(section, name: str) -> str:
    """Help of a flag setting a Literal field of a config section: the field and its values, read from the type."""
    from typing import get_args

    from qtune.config import RunConfig

    key = next(k for k, f in RunConfig.model_fields.items() if f.default_factory is section)
    return f"{key}.{name}: {', '.join(get_args(section.model_fields[name].annotation))}."


def _names(value: str | None):
    """A comma-separated flag value as a list of names (None when the flag was not given)."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _bool_flag(name: str, help: str):
    """A ``--NAME/--no-NAME`` option (unset: None, the config's value stands)."""
    return typer.Option(f"--{name}/--no-{name}", help=help)


EstConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML run config: estimate the run 'qtune train' would launch with it (its data is prepared for the "
        "longest sample and the supervised share).",
    ),
]
ModelFlag = Annotated[
    str | None,
    typer.Option(help="model.name: hub id, model directory (a config.json alone is enough), .gguf or alias."),
]
QuantFlag = Annotated[str | None, typer.Option(help=_choices(QuantConfig, "quant"))]
DoubleQuantFlag = Annotated[bool | None, _bool_flag("double-quant", "quant.double_quant.")]
RankFlag = Annotated[int | None, typer.Option("--r", min=0, help="lora.r; 0 = full fine-tuning (estimate only).")]
TargetsFlag = Annotated[str | None, typer.Option(help="lora.target_modules: all-linear or comma-separated names.")]
DoraFlag = Annotated[bool | None, _bool_flag("dora", "lora.use_dora.")]
DropoutFlag = Annotated[float | None, typer.Option(help="lora.lora_dropout.")]
OptimFlag = Annotated[str | None, typer.Option(help=_choices(TrainConfig, "optim"))]
BatchFlag = Annotated[int | None, typer.Option(help="train.batch_size (sequences per micro-batch).")]
CheckpointingFlag = Annotated[bool | None, _bool_flag("gradient-checkpointing", "train.gradient_checkpointing.")]
ComputeDtypeFlag = Annotated[str | None, typer.Option(help=_choices(QuantConfig, "compute_dtype"))]
UpcastFlag = Annotated[
    bool | None,
    _bool_flag("upcast-frozen", "train.upcast_frozen (PEFT's fp32 upcast on a quantized base, the stock recipe)."),
]
SkipFlag = Annotated[str | None, typer.Option(help="quant.skip_modules, comma-separated.")]
SeqLenOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="Tokens per sequence (default: the longest training sample with --config, else data.max_length)."
    ),
]
DeviceOpt = Annotated[
    Device | None,
    typer.Option(help="Peak allocated on cuda or peak RSS on cpu (default: where 'qtune train' would run here)."),
]
WorldSizeOpt = Annotated[int, typer.Option(min=1, help="Data-parallel GPUs; the estimate is per GPU.")]
StrategyOpt = Annotated[Strategy, typer.Option(help="Data parallelism with --world-size > 1.")]
LogitFractionOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Share of positions whose logits are computed (default: the supervised share with --config, else 1).",
    ),
]
FitOpt = Annotated[float | None, typer.Option("--fit", min=0.0, help="Also answer the largest batch that fits GIB.")]
EstJsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object; peak_gib is the predicted peak.")]


def _estimate_config(config: Path | None, set_: list[str] | None, flags: dict, trust_remote_code: bool):
    """The RunConfig ``qtune estimate`` counts: ``--config`` and ``--set`` read as ``qtune train`` reads them, then
    the flags given (``flags``: config field -> value). Each flag is first checked alone against the config types,
    so a bad value is reported under its flag's name (``--quant: Input should be 'none', ... (got 'nf5')``).
    Without ``--config`` the data file need not exist (the flag form reads no data).

    Raises:
        QtuneError: a bad flag value (one line per problem), or a bad config file or override.
    """
    from pydantic import ValidationError

    from qtune.config import RunConfig, load_config

    nested: dict = {}
    for key, value in flags.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    try:
        RunConfig.model_validate(nested, context={"saved_run": True})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"][:2])
            where = f"--{_ESTIMATE_FLAGS[key]}: " if key in _ESTIMATE_FLAGS else ""
            got = f" (got {e['input']!r})" if e["loc"] else ""
            lines.append(f"{where}{e['msg'].removeprefix('Value error, ')}{got}")
        raise QtuneError("\n".join(dict.fromkeys(lines))) from None
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items()]
    cfg = load_config(config, [*(set_ or []), *overrides], saved_run=config is None)
    remote_code(cfg, trust_remote_code)
    return cfg


def _estimate_inputs(
    cfg, from_file: bool, full_ft: bool, seq_len, device, world_size: int, strategy: Strategy, logit_fraction
):
    """(counts, shape) for ``cfg``: with a config file the data is prepared as ``qtune train`` would (longest
    training sample, supervised share; what ``qtune sweep`` records for the run) unless ``--seq-len`` and
    ``--logit-fraction`` both replace it; the flag form takes ``data.max_length`` and every position."""
    from dataclasses import replace

    from qtune.model.memory import prepared_split_stats, run_config_inputs

    if strategy == "fsdp" and world_size < 2:
        raise QtuneError("--strategy fsdp shards over GPUs: pass --world-size 2 or more")
    longest, share = None, None
    if from_file and (seq_len is None or logit_fraction is None):
        try:
            longest, share = prepared_split_stats(cfg)
        except QtuneError as e:
            raise QtuneError(
                f"{e} (the estimate reads the training split for its longest sample and supervised "
                "share; give --seq-len and --logit-fraction to estimate without it)"
            ) from None
    counts, shape = run_config_inputs(cfg, seq_len or longest, device, share, world_size, strategy)
    if full_ft:
        shape = replace(shape, r=0)
    if logit_fraction is not None:
        shape = replace(shape, logit_fraction=logit_fraction)
    return counts, shape


def _echo_estimate(est, fitted: dict | None, json_out: bool) -> None:
    if json_out:
        typer.echo(dumps(est.to_dict() | ({"fit": fitted} if fitted else {})))
        return
    typer.echo(est.table())
    s = est.shape
    typer.echo(
        f"inputs: {s.device}, {s.world_size} x {s.strategy}, batch {s.batch_size} x seq_len {s.seq_len}, "
        f"quant {s.quant}, r {s.r}, optim {s.optim}, logits at {s.logit_fraction:.3g} of the positions"
    )
    typer.echo(f"trainable parameters: {est.trainable_params:,} of {est.total_params:,}")
    if fitted:
        typer.echo(
            f"largest batch at {fitted['seq_len']} tokens: {fitted['max_batch_size']} "
            f"(budget {fitted['budget_gib']} GiB)"
        )
        for row in fitted["table"]:
            typer.echo(f"  seq_len {row['seq_len']:>6}: batch {row['max_batch_size']:>5}  ({row['tokens']:,} tokens)")


def _estimate_and_fit(counts, shape, fit_gib: float | None):
    """(the estimate of ``shape``, the largest batch that fits ``fit_gib`` GiB or None without ``--fit``)."""
    from qtune.model.memory import estimate as run_estimate
    from qtune.model.memory import fit

    est = run_estimate(counts, shape)
    if fit_gib is None:
        return est, None
    return est, fit(counts, shape, fit_gib, getattr(counts.config, "max_position_embeddings", None))


@app.command()
def estimate(
    config: EstConfigOpt = None,
    set_: SetOpt = None,
    model: ModelFlag = None,
    quant: QuantFlag = None,
    double_quant: DoubleQuantFlag = None,
    r: RankFlag = None,
    target_modules: TargetsFlag = None,
    dora: DoraFlag = None,
    lora_dropout: DropoutFlag = None,
    optim: OptimFlag = None,
    batch_size: BatchFlag = None,
    gradient_checkpointing: CheckpointingFlag = None,
    compute_dtype: ComputeDtypeFlag = None,
    upcast_frozen: UpcastFlag = None,
    skip_modules: SkipFlag = None,
    seq_len: SeqLenOpt = None,
    device: DeviceOpt = None,
    world_size: WorldSizeOpt = 1,
    strategy: StrategyOpt = "ddp",
    logit_fraction: LogitFractionOpt = None,
    fit_gib: FitOpt = None,
    json_out: EstJsonOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Predict peak training memory, term by term, from the model's config alone (no weights): of the run a
    config describes (--config, --set), or of qtune's defaults changed by the flags (each flag sets the config
    field its help names)."""
    flags = {
        "model.name": model,
        "quant.quant": quant,
        "quant.double_quant": double_quant,
        "quant.compute_dtype": compute_dtype,
        "quant.skip_modules": _names(skip_modules),
        "lora.r": r or None,
        "lora.use_dora": dora,
        "lora.lora_dropout": lora_dropout,
        "lora.target_modules": target_modules if target_modules in (None, "all-linear") else _names(target_modules),
        "train.optim": optim,
        "train.batch_size": batch_size,
        "train.gradient_checkpointing": gradient_checkpointing,
        "train.upcast_frozen": upcast_frozen,
    }
    try:
        quiet_libraries()
        cfg = _estimate_config(config, set_, {k: v for k, v in flags.items() if v is not None}, trust_remote_code)
        counts, shape = _estimate_inputs(
            cfg, config is not None, r == 0, seq_len, device, world_size, strategy, logit_fraction
        )
        est, fitted = _estimate_and_fit(counts, shape, fit_gib)
    except QtuneError as e:
        fail(str(e))
    _echo_estimate(est, fitted, json_out)
