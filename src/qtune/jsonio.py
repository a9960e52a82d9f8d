"""Strict JSON output: what qtune writes parses with any JSON reader.

Python's ``json.dumps`` writes a non-finite float as ``NaN``, ``Infinity`` or ``-Infinity``, which is not JSON
(RFC 8259) and which strict readers (``jq``, JavaScript's ``JSON.parse``, Go, Rust's serde_json) reject. qtune
writes ``null`` for such a value instead; a reader then sees "no finite value" (e.g. the loss of a diverged step).
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (nan, inf, -inf) replaced by None, through dicts, lists and tuples
    (tuples become lists, as JSON has no tuples); other values are returned unchanged."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of ``obj`` with non-finite floats written as ``null`` (see :func:`finite_or_none`);
    ``kwargs`` go to ``json.dumps`` (``indent``, ``sort_keys``). Never emits NaN or Infinity."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
