"""The generation engine, for the serve stage's front ends: it lives in :mod:`qtune.generate` (below both evaluate
and serve, so HumanEval generates through the same path); this module re-exports it."""

from qtune.generate import (  # noqa: F401 (re-exported)
    LOCK_POLL_S,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MERGED_META,
    AnswerEnd,
    Completion,
    Engine,
    GenerationSettings,
    HeaderStop,
    SettingsError,
    StreamState,
)
