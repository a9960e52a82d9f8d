from pathlib import Path

import pytest

from qtune.config import RunConfig, load_config
from qtune.errors import QtuneError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))  # run configs; launch/ holds accelerate's files
LAUNCH = sorted((CONFIG_DIR / "launch").glob("*.yaml"))


def test_defaults_are_the_main_job():
    cfg = load_config()
    assert (cfg.model.name, cfg.quant.quant, cfg.quant.double_quant, cfg.lora.r) == (
        "smollm2-135m-instruct",
        "nf4",
        True,
        16,
    )
    assert cfg.lora.target_modules == "all-linear"
    assert Path(cfg.data.path).is_file()
    assert cfg.data.split == (0.90, 0.05, 0.05)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(load_config(path), RunConfig)


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None,
        ["lora.r=4", "train.learning_rate=1e-3", "lora.target_modules=[q_proj, v_proj]", "quant.double_quant=false"],
    )
    assert cfg.lora.r == 4 and cfg.train.learning_rate == 1e-3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.quant.double_quant is False


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.r=0", "lora.r: Input should be greater than 0"),
        ("quant.quant=int3", "quant.quant: Input should be 'none', 'fp16', 'bf16', 'int8', 'nf4' or 'fp4'"),
        ("data.path=/nonexistent/rows.json", "data.path: data file not found: /nonexistent/rows.json"),
        ("train.max_stepz=3", "train.max_stepz: unknown key"),
        ("data.split=[0.5, 0.2, 0.2]", "data.split: expected three non-negative fractions summing to 1"),
        ("train.warmup_steps=100", "warmup_steps (100) must be below max_steps (60)"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_field(override, expected):
    with pytest.raises(QtuneError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert expected in message
    assert len(message.splitlines()) == 1


def test_all_problems_reported_at_once():
    with pytest.raises(QtuneError) as err:
        load_config(None, ["lora.r=-1", "train.batch_size=0"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "lora.r" in lines[0] and "train.batch_size" in lines[1]


def test_bad_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: 8\n  lora_alpha: [16\n")
    with pytest.raises(QtuneError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_override_without_equals_sign():
    with pytest.raises(QtuneError, match="expected key=value"):
        load_config(None, ["lora.r"])


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_launch_files_are_valid_accelerate_configs(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(path)
    assert cfg.num_processes >= 2 and cfg.mixed_precision == "bf16"


def test_gguf_cache_key_follows_the_content_not_the_path(tmp_path, monkeypatch):
    import os

    from qtune.model.load import gguf_cache_dir

    monkeypatch.setenv("QTUNE_CACHE_DIR", str(tmp_path / "cache"))
    body = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit: head and tail are different MiBs
    a, b = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(body)
    os.utime(b, ns=(1, 1))
    assert gguf_cache_dir(a) == gguf_cache_dir(b) and gguf_cache_dir(a).parent == tmp_path / "cache" / "gguf"
    b.write_bytes(body[:-1] + b"\x00")  # same name and size, another last byte
    assert gguf_cache_dir(a) != gguf_cache_dir(b)


def _float_fields():
    """(dotted name, annotation) of every field that holds a float, in every section of RunConfig and in the sweep
    file's spec, read from the pydantic models themselves."""
    import typing

    from pydantic import BaseModel

    from qtune.study.sweep import SweepSpec

    def has_float(tp) -> bool:
        return tp is float or any(has_float(a) for a in typing.get_args(tp))

    out = []
    for section, info in RunConfig.model_fields.items():
        model = info.annotation
        assert issubclass(model, BaseModel)
        out += [
            (f"{section}.{name}", f.annotation) for name, f in model.model_fields.items() if has_float(f.annotation)
        ]
    out += [(f"sweep.{name}", f.annotation) for name, f in SweepSpec.model_fields.items() if has_float(f.annotation)]
    return out


FLOAT_FIELDS = _float_fields()


def test_the_float_fields_are_found():
    names = {n for n, _ in FLOAT_FIELDS}
    assert {
        "train.learning_rate",
        "lora.lora_alpha",
        "train.max_grad_norm",
        "train.weight_decay",
        "data.split",
        "lora.lora_dropout",
        "lora.loraplus_lr_ratio",
        "sweep.alpha_per_r",
        "sweep.timeout_s",
        "sweep.reference_memory_gb",
    } <= names


@pytest.mark.parametrize("bad", [".inf", "-.inf", ".nan", "1e400"])
@pytest.mark.parametrize("name, annotation", FLOAT_FIELDS, ids=[n for n, _ in FLOAT_FIELDS])
def test_every_float_field_refuses_non_finite_numbers(tmp_path, name, annotation, bad):
    import typing

    section, field = name.split(".")
    is_tuple = typing.get_origin(annotation) is tuple
    is_dict = typing.get_origin(annotation) is dict
    value = f"[{bad}, 0.5, 0.5]" if is_tuple else f"{{x: {bad}}}" if is_dict else bad  # a tuple's first, a dict's x
    where = f"{name}.0" if is_tuple else f"{name}.x" if is_dict else name
    if section == "sweep":
        from qtune.study.sweep import load_sweep

        spec = tmp_path / "sweep.yaml"
        spec.write_text(f"axes: {{lora.r: [4]}}\n{field}: {value}\n")
        with pytest.raises(QtuneError) as err:
            load_sweep(spec)
        where = where.removeprefix("sweep.")
    else:
        with pytest.raises(QtuneError) as err:
            load_config(None, [f"{name}={value}"])
    [line] = str(err.value).splitlines()
    assert f"{where}: Input should be a finite number (got " in line, line


def test_quant_format_groups_come_from_the_config_literal():
    from typing import get_args

    from qtune.config import FOUR_BIT, KBIT, QUANT_FORMATS, SIXTEEN_BIT, QuantConfig

    assert QUANT_FORMATS == get_args(QuantConfig.model_fields["quant"].annotation)
    assert QUANT_FORMATS == ("none", "fp16", "bf16", "int8", "nf4", "fp4")
    assert (FOUR_BIT, KBIT, SIXTEEN_BIT) == (("nf4", "fp4"), ("int8", "nf4", "fp4"), ("fp16", "bf16"))
    assert sorted(("none", *SIXTEEN_BIT, *KBIT)) == sorted(QUANT_FORMATS)  # each format in exactly one group


def test_template_and_benchmark_names_come_from_the_config_fields():
    from typing import get_args

    from qtune.config import DataConfig
    from qtune.data.decontaminate import BENCHMARKS
    from qtune.data.templates import TEMPLATES

    assert TEMPLATES == get_args(DataConfig.model_fields["template"].annotation) == ("alpaca", "chat")
    assert BENCHMARKS == get_args(get_args(DataConfig.model_fields["decontaminate"].annotation)[0]) == ("humaneval",)


@pytest.mark.parametrize("quant", ["none", "fp16", "bf16", "int8", "nf4", "fp4"])
def test_loader_and_memory_model_agree_on_each_format(quant):
    from qtune.config import QuantConfig
    from qtune.model.memory import TrainShape, quantized_weight_bytes
    from qtune.model.quantize import is_quantized, load_kwargs

    q = QuantConfig(quant=quant)
    quantized = quant in ("int8", "nf4", "fp4")
    assert is_quantized(q) is TrainShape(quant=quant).quantized is quantized
    assert ("quantization_config" in load_kwargs(q)) is quantized
    assert quantized_weight_bytes(1001, quant) == (501 if quant in ("nf4", "fp4") else 1001)


def test_format_messages_list_the_one_definition(tmp_path):
    from qtune.generate import Engine
    from qtune.serve.export import export_merged

    with pytest.raises(QtuneError) as e:
        Engine(str(tmp_path), quant="nf5")
    assert str(e.value) == "--quant 'nf5': expected one of none, fp16, bf16, int8, nf4, fp4"
    with pytest.raises(QtuneError) as e:
        export_merged(tmp_path, tmp_path / "out", dtype="fp32")
    assert str(e.value) == "--dtype 'fp32': expected one of fp16, bf16"


def test_byte_units():
    from qtune.units import GIB, MIB

    assert (MIB, GIB) == (2**20, 2**30)


def test_a_bad_set_value_over_a_config_file_names_the_set_not_the_file(tmp_path):
    from qtune.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 10\n")
    with pytest.raises(QtuneError) as err:
        load_config(path, ["train.learning_rate=.inf"])
    assert str(err.value) == "--set train.learning_rate: Input should be a finite number (got inf)"
    path.write_text("train:\n  learning_rate: .inf\n")
    with pytest.raises(QtuneError) as err:
        load_config(path, ["train.max_steps=5"])
    assert str(err.value) == f"{path}: train.learning_rate: Input should be a finite number (got inf)"
