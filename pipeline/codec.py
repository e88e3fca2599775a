"""Columnar decoding of a consumed batch (the worker's hot path); output encoding is :mod:`pipeline.encode`.

:func:`decode_batch` applies the :class:`~pipeline.schemas.Reading` contract plus the worker's limits to a
whole batch without building a pydantic object per message: ``orjson.loads`` (``json.loads`` where orjson
refuses or would read an integer event time as a float) and exact type checks per message, then one numpy
conversion and one vectorised finiteness check per batch.  Every input message
ends up either in the decoded columns or in ``rejects``, exactly once, with the first failing check in this
order::

    empty > oversize > undecodable > malformed_json > schema > non_finite > wrong_length
          > bad_timestamp > key_mismatch

(``schema`` covers non-objects, missing fields, wrong types, empty/blank/over-long or invalid-Unicode
device ids.)  Bad messages never raise; they become dead letters (:mod:`pipeline.dlq`).

>>> limits = DecodeLimits(n_channels=2, max_payload_bytes=1024, ts_min_ms=0, max_future_ms=60_000)
>>> batch = decode_batch(
...     [b'{"device_id": "a", "ts": 1000, "values": [1, 2.5]}',
...      b'{"device_id": "b", "ts": 1000, "values": [1, NaN]}',
...      None],
...     keys=[b"a", None, None], limits=limits, now_ms=2000)
>>> batch.index.tolist(), batch.device_ids, batch.values.tolist()
([0], ['a'], [[1.0, 2.5]])
>>> [(r.index, r.reason.value, r.detail) for r in batch.rejects]
[(1, 'non_finite', 'values[1] is NaN'), (2, 'empty', 'payload is null')]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from pipeline.encode import encode_json, encode_json_finite
from pipeline.errors import ConfigurationError, DecodeError
from pipeline.schemas import MAX_DEVICE_ID_CHARS, DeadLetterReason, describe_non_finite

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = ["DecodeLimits", "DecodedBatch", "Reject", "decode_batch", "encode_json", "encode_json_finite"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MISSING = object()  # orjson refused the payload
_NUMBER_TYPES = frozenset((float, int))  # exact types: bool is not a number on the wire
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


@dataclass(frozen=True)
class Reject:
    """An invalid message: its position in the input batch, why, and a human-readable detail that names
    the offending field (``"values[3] is NaN"``)."""

    index: int
    reason: DeadLetterReason
    detail: str


@dataclass(frozen=True, eq=False)
class DecodedBatch:
    """The valid messages of a batch as columns (row ``k`` is input message ``index[k]``), plus rejects.

    ``values`` is float32 ``[M, n_channels]``, C-contiguous; ``ts_ms`` is int64 epoch milliseconds.
    """

    index: npt.NDArray[np.int64]
    device_ids: list[str]
    ts_ms: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]
    channels: list[list[str] | None]
    rejects: list[Reject]

    def __len__(self) -> int:
        return len(self.device_ids)


@dataclass(frozen=True)
class DecodeLimits:
    """What the codec accepts beyond the schema: channel count, payload size, event-time window (ms)."""

    n_channels: int
    max_payload_bytes: int
    ts_min_ms: int
    max_future_ms: int

    def __post_init__(self) -> None:
        for name in ("n_channels", "max_payload_bytes"):
            if getattr(self, name) < 1:
                msg = f"{name} must be >= 1, got {getattr(self, name)}"
                raise ConfigurationError(msg)
        if self.max_future_ms < 0:
            msg = f"max_future_ms must be >= 0, got {self.max_future_ms}"
            raise ConfigurationError(msg)

    @classmethod
    def from_settings(cls, settings: Settings, n_channels: int) -> DecodeLimits:
        """Limits from the worker settings (``max_future_s`` is converted to milliseconds)."""
        return cls(n_channels=n_channels, max_payload_bytes=settings.max_payload_bytes,
                   ts_min_ms=settings.ts_min_ms, max_future_ms=round(settings.max_future_s * 1000))


class _Rejected(Exception):
    """Control flow inside this module only: one message fails a check."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _short(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _non_finite_detail(values: list[Any]) -> str | None:
    """Describe the first value that is not finite in float32 (same rule as ``Reading``), else None."""
    for j, value in enumerate(values):
        what = describe_non_finite(value)
        if what is not None:
            return f"values[{j}] {what}"
    return None


def _field(obj: dict[str, Any], name: str, kind: type, expected: str) -> Any:
    """``obj[name]`` when its exact type is ``kind`` (so bool is not int), else a ``schema`` rejection."""
    value = obj.get(name)
    if type(value) is not kind:
        what = "is missing" if name not in obj else f"must be {expected}, got {_json_type(value)}"
        raise _Rejected(DeadLetterReason.SCHEMA, f"{name} {what}")
    return value


def _check_finite(values: list[Any]) -> None:
    detail = _non_finite_detail(values)
    if detail is not None:
        raise _Rejected(DeadLetterReason.NON_FINITE, detail)


def _parse(payload: bytes | None, key: bytes | None, limits: DecodeLimits, min_ts: int,
           max_ts: int) -> tuple[str, int, list[Any], list[str] | None]:
    """One message's device id, ts, raw values and channel names; raises ``_Rejected``.

    Finiteness is checked here only when another reason would otherwise win (to keep the precedence);
    the batch checks it for everything else in one vectorised pass.
    """
    if payload is None or len(payload) == 0:
        raise _Rejected(DeadLetterReason.EMPTY, "payload is null" if payload is None else "payload is empty")
    if len(payload) > limits.max_payload_bytes:
        detail = f"payload is {len(payload)} bytes, limit {limits.max_payload_bytes}"
        raise _Rejected(DeadLetterReason.OVERSIZE, detail)
    obj: Any = _MISSING
    try:
        obj = orjson.loads(payload)  # strict RFC 8259, about 5x faster than json.loads
    except orjson.JSONDecodeError:
        pass  # json.loads decides (NaN literals, 1e400, ...) and words the error as it always has
    # orjson reads an integer beyond 64 bits as the float of the same value: the same number everywhere
    # except where the type matters, the event time (json.loads keeps it an int: a range error, not schema).
    if type(obj) is dict and type(obj.get("ts")) is float:
        obj = _MISSING
    try:
        if obj is _MISSING:
            obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as ex:
        detail = f"payload is not UTF-8: {ex.reason} at byte {ex.start}"
        raise _Rejected(DeadLetterReason.UNDECODABLE, detail) from None
    except RecursionError:
        raise _Rejected(DeadLetterReason.MALFORMED_JSON, "invalid JSON: nested too deeply") from None
    except ValueError as ex:  # JSONDecodeError, or an integer literal beyond Python's digit limit
        raise _Rejected(DeadLetterReason.MALFORMED_JSON, f"invalid JSON: {ex}") from None
    if type(obj) is not dict:
        raise _Rejected(DeadLetterReason.SCHEMA, f"payload must be a JSON object, got {_json_type(obj)}")

    device_id: str = _field(obj, "device_id", str, "a string")
    if not 0 < len(device_id) <= MAX_DEVICE_ID_CHARS:
        what = "is empty" if not device_id else f"is longer than {MAX_DEVICE_ID_CHARS} characters"
        raise _Rejected(DeadLetterReason.SCHEMA, f"device_id {what}")
    if not device_id.strip():
        raise _Rejected(DeadLetterReason.SCHEMA, "device_id is blank")
    try:
        device_key = device_id.encode("utf-8")
    except UnicodeEncodeError:
        raise _Rejected(DeadLetterReason.SCHEMA, "device_id is not valid Unicode (lone surrogate)") from None

    ts: int = _field(obj, "ts", int, "an integer (epoch ms)")
    values: list[Any] = _field(obj, "values", list, "an array")
    if not values:
        raise _Rejected(DeadLetterReason.SCHEMA, "values is empty")
    if not _NUMBER_TYPES.issuperset(map(type, values)):
        j, bad = next((j, v) for j, v in enumerate(values) if type(v) not in _NUMBER_TYPES)
        raise _Rejected(DeadLetterReason.SCHEMA, f"values[{j}] must be a number, got {_json_type(bad)}")

    channels = obj.get("channels")
    if channels is not None:
        if type(channels) is not list:
            detail = f"channels must be an array of strings or null, got {_json_type(channels)}"
            raise _Rejected(DeadLetterReason.SCHEMA, detail)
        for j, name in enumerate(channels):
            if type(name) is not str:
                detail = f"channels[{j}] must be a string, got {_json_type(name)}"
                raise _Rejected(DeadLetterReason.SCHEMA, detail)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                detail = f"channels[{j}] is not valid Unicode (lone surrogate)"
                raise _Rejected(DeadLetterReason.SCHEMA, detail) from None
        if len(channels) != len(values):
            _check_finite(values)
            detail = f"channels has {len(channels)} names for {len(values)} values"
            raise _Rejected(DeadLetterReason.WRONG_LENGTH, detail)

    if len(values) != limits.n_channels:
        _check_finite(values)
        detail = f"values has {len(values)} entries, expected {limits.n_channels}"
        raise _Rejected(DeadLetterReason.WRONG_LENGTH, detail)
    if not min_ts <= ts <= max_ts:
        _check_finite(values)
        where = f"before ts_min_ms {limits.ts_min_ms}" if ts < min_ts else \
            f"more than {limits.max_future_ms} ms ahead of now ({max_ts - limits.max_future_ms})"
        raise _Rejected(DeadLetterReason.BAD_TIMESTAMP, f"ts {ts} is {where}")
    if key is not None and key != device_key:
        _check_finite(values)
        key_text = bytes(key).decode("utf-8", errors="backslashreplace")
        detail = f"message key {_short(key_text)} != device_id {_short(device_id)}"
        raise _Rejected(DeadLetterReason.KEY_MISMATCH, detail)
    return device_id, ts, values, channels


def _to_float64(rows: list[list[Any]], n_channels: int) -> npt.NDArray[np.float64]:
    """Rows of JSON numbers as float64 ``[M, C]``; a row holding an int too large for a float is NaN."""
    try:
        return np.array(rows, dtype=np.float64).reshape(len(rows), n_channels)
    except OverflowError:
        out = np.empty((len(rows), n_channels), dtype=np.float64)
        for r, row in enumerate(rows):
            try:
                out[r] = row
            except OverflowError:
                out[r] = np.nan
        return out


def decode_batch(payloads: Sequence[bytes | None], keys: Sequence[bytes | None] | None,
                 limits: DecodeLimits, now_ms: int) -> DecodedBatch:
    """Decode and validate a consumed batch; ``keys`` are the message keys (``None``: no key check).

    A present key must equal the UTF-8 ``device_id`` (state is partitioned by key).  ``now_ms`` is the
    wall clock in epoch milliseconds, for the ``max_future_ms`` check.  ``len(result) +
    len(result.rejects) == len(payloads)``; rejects are sorted by index.  Raises :class:`DecodeError` only
    when ``keys`` and ``payloads`` differ in length.
    """
    if keys is not None and len(keys) != len(payloads):
        msg = f"keys has {len(keys)} entries but payloads has {len(payloads)}"
        raise DecodeError(msg)
    min_ts = max(limits.ts_min_ms, _INT64_MIN)
    max_ts = min(now_ms + limits.max_future_ms, _INT64_MAX)
    index: list[int] = []
    device_ids: list[str] = []
    ts_list: list[int] = []
    rows: list[list[Any]] = []
    channels: list[list[str] | None] = []
    rejects: list[Reject] = []
    for i, payload in enumerate(payloads):
        try:
            device_id, ts, values, names = _parse(payload, None if keys is None else keys[i], limits,
                                                  min_ts, max_ts)
        except _Rejected as rej:
            rejects.append(Reject(i, rej.reason, rej.detail))
            continue
        index.append(i)
        device_ids.append(device_id)
        ts_list.append(ts)
        rows.append(values)
        channels.append(names)

    values64 = _to_float64(rows, limits.n_channels)
    with np.errstate(over="ignore", invalid="ignore"):
        values32 = values64.astype(np.float32)
    finite = np.isfinite(values32).all(axis=1)
    index_arr = np.array(index, dtype=np.int64)
    ts_arr = np.array(ts_list, dtype=np.int64)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        for r in bad.tolist():
            detail = _non_finite_detail(rows[r]) or "values are not finite in float32"
            rejects.append(Reject(index[r], DeadLetterReason.NON_FINITE, detail))
        rejects.sort(key=lambda rej: rej.index)
        keep = np.flatnonzero(finite).tolist()
        device_ids = [device_ids[r] for r in keep]
        channels = [channels[r] for r in keep]
        index_arr, ts_arr, values32 = index_arr[finite], ts_arr[finite], values32[finite]
    return DecodedBatch(index=index_arr, device_ids=device_ids, ts_ms=ts_arr,
                        values=np.ascontiguousarray(values32), channels=channels, rejects=rejects)
