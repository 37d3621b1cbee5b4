"""Strict JSON (RFC 8259) for everything d4s writes: ``meta.json``, the ledger's JSON columns,
``--json`` output, training metrics.

Python's :mod:`json` writes ``NaN`` and ``Infinity`` by default, tokens that strict parsers
(browsers, jq, Arrow, most languages) reject. A measure that could not be computed (the drift of
a clip none of whose tracks was visible twice, a loss that diverged) is written as ``null``
instead, and numpy scalars and arrays become plain numbers and lists. Finite data serialises
exactly as :func:`json.dumps` would, so shards stay byte-reproducible.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, numpy scalars/arrays as Python numbers/lists."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """:func:`json.dumps` of :func:`jsonable` (``obj``); never writes NaN or Infinity."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)
