"""Validated run configuration: one pydantic object, loaded from YAML plus ``key=value`` overrides.

Every field carries a description (its docstring). Unknown keys are errors, so a typo never turns into a silent
default. Checks that need only the config run here; checks that need the model's config file (``max_length``
against the context window) run in :mod:`qtune.model.load` before any weights load.

The package, by concern: :mod:`~qtune.config.schema` (the sections, their fields and checks),
:mod:`~qtune.config.loading` (YAML files, ``--set`` overrides, one-line validation errors) and
:mod:`~qtune.config.paths` (the shared data directory, local path or hub id); every name is importable from
``qtune.config``.
"""

from __future__ import annotations

from qtune.config.loading import (
    RESUME_SETTABLE,
    apply_overrides,
    check_resume_overrides,
    format_validation_error,
    load_config,
    read_yaml,
    save_config,
)
from qtune.config.paths import (
    DATA_FILE_SUFFIXES,
    default_data_path,
    default_humaneval_path,
    is_local_path,
    shared_data_dir,
)
from qtune.config.schema import (
    DEFAULT_MODEL,
    FOUR_BIT,
    KBIT,
    QUANT_FORMATS,
    REQUIRE_CUDA_MESSAGE,
    SIXTEEN_BIT,
    Benchmark,
    DataConfig,
    LoraSettings,
    ModelConfig,
    Quant,
    QuantConfig,
    RunConfig,
    TrainConfig,
    check_require_cuda,
)

__all__ = [
    "DATA_FILE_SUFFIXES",
    "DEFAULT_MODEL",
    "FOUR_BIT",
    "KBIT",
    "QUANT_FORMATS",
    "REQUIRE_CUDA_MESSAGE",
    "RESUME_SETTABLE",
    "SIXTEEN_BIT",
    "Benchmark",
    "DataConfig",
    "LoraSettings",
    "ModelConfig",
    "Quant",
    "QuantConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "check_require_cuda",
    "check_resume_overrides",
    "default_data_path",
    "default_humaneval_path",
    "format_validation_error",
    "is_local_path",
    "load_config",
    "read_yaml",
    "save_config",
    "shared_data_dir",
]
