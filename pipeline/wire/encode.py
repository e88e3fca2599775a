"""JSON encoding of output records: the checking encoder and the worker's fast one for finite records.

Split from :mod:`liquidstream.pipeline.wire.codec` (which re-exports both), so decoding and encoding stay one concept
each.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from liquidstream.pipeline.errors import EncodeError

__all__ = ["encode_json", "encode_json_finite"]


def _json_default(obj: object) -> object:
    model_dump = getattr(obj, "model_dump", None)  # pydantic models (the output records)
    if callable(model_dump):
        return model_dump(mode="json")
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    msg = f"{type(obj).__name__} is not JSON serialisable"
    raise TypeError(msg)


def encode_json(obj: object) -> bytes:
    """Compact UTF-8 JSON for an output record; NaN/Infinity raise :class:`EncodeError`.

    Pydantic models, numpy scalars and arrays are converted.

    >>> encode_json({"device_id": "a", "score": np.float32(0.5), "forecast": np.array([1.0, 2.0])})
    b'{"device_id":"a","score":0.5,"forecast":[1.0,2.0]}'
    >>> try:
    ...     encode_json({"score": float("nan")})
    ... except EncodeError as ex:
    ...     print(type(ex).__name__, "-", ex.__cause__.__class__.__name__)
    EncodeError - ValueError
    """
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False,
                          default=_json_default)
        return text.encode("utf-8")
    except (TypeError, ValueError) as ex:  # UnicodeEncodeError (lone surrogate) is a ValueError
        msg = f"cannot encode record as JSON: {ex}"
        raise EncodeError(msg) from ex


def encode_json_finite(obj: dict[str, Any]) -> bytes:
    """:func:`encode_json` for a record of plain Python values whose floats the caller has checked to be
    finite (orjson writes NaN as ``null`` instead of failing): the worker's per-prediction encoder.

    >>> encode_json_finite({"device_id": "pump-7", "score": None, "forecast": [0.5, 1e-05]})
    b'{"device_id":"pump-7","score":null,"forecast":[0.5,0.00001]}'
    """
    try:
        return orjson.dumps(obj)
    except TypeError as ex:  # orjson.JSONEncodeError: a lone surrogate, a non-str key, an unknown type
        msg = f"cannot encode record as JSON: {ex}"
        raise EncodeError(msg) from ex
