"""The per-message checks of a consumed reading: the :class:`~liquidstream.pipeline.wire.schemas.Reading` contract plus
the
worker's :class:`DecodeLimits`, in the precedence order documented in :mod:`liquidstream.pipeline.wire.codec`.

:func:`parse_reading` is the exact, slow path: it decides every message the batch decoder's fast path does not
accept outright, and words why a message is rejected (:class:`Rejected`: reason and detail).

>>> limits = DecodeLimits(n_channels=1, max_payload_bytes=1024, ts_min_ms=0, max_future_ms=0)
>>> parse_reading(b'{"device_id": "a", "ts": 5, "values": [1]}', b"a", limits, 0, 10)
('a', 5, [1], None)
>>> try:
...     parse_reading(b'{"device_id": "a", "ts": 5, "values": [true]}', None, limits, 0, 10)
... except Rejected as rej:
...     print(rej.reason.value, "-", rej.detail)
schema - values[0] must be a number, got boolean
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.wire.mapping import InputMapping
from liquidstream.pipeline.wire.schemas import MAX_DEVICE_ID_CHARS, DeadLetterReason, describe_non_finite

if TYPE_CHECKING:
    from liquidstream.pipeline.settings import Settings

__all__ = ["LONG_SHAPE_NOT_FAUST", "NUMBER_TYPES", "DecodeLimits", "Rejected", "check_reading", "load_payload",
           "non_finite_detail", "parse_reading"]

_MISSING = object()  # orjson refused the payload
#: Why the faust app refuses ``mapping.shape = long`` (``run``, ``train``, ``train-worker`` and ``replay`` read it).
LONG_SHAPE_NOT_FAUST = ("the faust app does not read the long input shape (its agent has no place for channels "
                        "waiting across batches): run `liquidstream run` instead, or reshape the topic to the wide "
                        "shape (one message per device and time)")
NUMBER_TYPES = frozenset((float, int))  # exact types: bool is not a number on the wire
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


@dataclass(frozen=True)
class DecodeLimits:
    """What the codec accepts beyond the schema: channel count, payload size, event-time window (ms)."""

    n_channels: int
    max_payload_bytes: int
    ts_min_ms: int
    max_future_ms: int
    #: A consumed message without a key is a ``key_mismatch`` (state is partitioned by key: a keyless
    #: device's readings would be spread over partitions, each owner keeping its own state of it).  Applies
    #: only where there are keys to check (not to file replays).
    require_key: bool = False
    #: The input's JSON shape and field names (default: liquidstream's own reading).
    mapping: InputMapping = field(default_factory=InputMapping)

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
                   ts_min_ms=settings.ts_min_ms, max_future_ms=round(settings.max_future_s * 1000),
                   require_key=settings.require_key, mapping=settings.mapping)


class Rejected(Exception):
    """Control flow inside this module only: one message fails a check."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _short(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def non_finite_detail(values: list[Any]) -> str | None:
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
        raise Rejected(DeadLetterReason.SCHEMA, f"{name} {what}")
    return value


def _check_finite(values: list[Any]) -> None:
    detail = non_finite_detail(values)
    if detail is not None:
        raise Rejected(DeadLetterReason.NON_FINITE, detail)


def load_payload(payload: bytes | None, limits: DecodeLimits) -> Any:
    """A message's JSON value; raises ``Rejected`` (empty, oversize, undecodable, malformed_json)."""
    if payload is None or len(payload) == 0:
        raise Rejected(DeadLetterReason.EMPTY, "payload is null" if payload is None else "payload is empty")
    if len(payload) > limits.max_payload_bytes:
        detail = f"payload is {len(payload)} bytes, limit {limits.max_payload_bytes}"
        raise Rejected(DeadLetterReason.OVERSIZE, detail)
    obj: Any = _MISSING
    try:
        obj = orjson.loads(payload)  # strict RFC 8259, about 5x faster than json.loads
    except orjson.JSONDecodeError:
        pass  # json.loads decides (NaN literals, 1e400, ...) and words the error as it always has
    # orjson reads an integer beyond 64 bits as the float of the same value: the same number everywhere
    # except where the type matters, the event time (json.loads keeps it an int: a range error, not schema).
    if type(obj) is dict and any(type(v) is float and v.is_integer() for v in obj.values()):
        obj = _MISSING
    try:
        if obj is _MISSING:
            obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as ex:
        detail = f"payload is not UTF-8: {ex.reason} at byte {ex.start}"
        raise Rejected(DeadLetterReason.UNDECODABLE, detail) from None
    except RecursionError:
        raise Rejected(DeadLetterReason.MALFORMED_JSON, "invalid JSON: nested too deeply") from None
    except ValueError as ex:  # JSONDecodeError, or an integer literal beyond Python's digit limit
        raise Rejected(DeadLetterReason.MALFORMED_JSON, f"invalid JSON: {ex}") from None
    if type(obj) is not dict:
        raise Rejected(DeadLetterReason.SCHEMA, f"payload must be a JSON object, got {_json_type(obj)}")
    return obj


def parse_reading(payload: bytes | None, key: bytes | None, limits: DecodeLimits, min_ts: int,
                  max_ts: int) -> tuple[str, int, list[Any], list[str] | None]:
    """One message's device id, ts, raw values and channel names; raises ``Rejected``.

    Finiteness is checked here only when another reason would otherwise win (to keep the precedence);
    the batch checks it for everything else in one vectorised pass.
    """
    return check_reading(load_payload(payload, limits), key, limits, min_ts, max_ts)


def check_reading(obj: dict[str, Any], key: bytes | None, limits: DecodeLimits, min_ts: int,
                  max_ts: int) -> tuple[str, int, list[Any], list[str] | None]:
    """:func:`parse_reading` of a parsed JSON object in the native reading shape (also what an input mapping
    makes of another shape)."""
    device_id: str = _field(obj, "device_id", str, "a string")
    if not 0 < len(device_id) <= MAX_DEVICE_ID_CHARS:
        what = "is empty" if not device_id else f"is longer than {MAX_DEVICE_ID_CHARS} characters"
        raise Rejected(DeadLetterReason.SCHEMA, f"device_id {what}")
    if not device_id.strip():
        raise Rejected(DeadLetterReason.SCHEMA, "device_id is blank")
    try:
        device_key = device_id.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(DeadLetterReason.SCHEMA, "device_id is not valid Unicode (lone surrogate)") from None

    ts: int = _field(obj, "ts", int, "an integer (epoch ms)")
    values: list[Any] = _field(obj, "values", list, "an array")
    if not values:
        raise Rejected(DeadLetterReason.SCHEMA, "values is empty")
    if not NUMBER_TYPES.issuperset(map(type, values)):
        j, bad = next((j, v) for j, v in enumerate(values) if type(v) not in NUMBER_TYPES)
        raise Rejected(DeadLetterReason.SCHEMA, f"values[{j}] must be a number, got {_json_type(bad)}")

    channels = obj.get("channels")
    if channels is not None:
        if type(channels) is not list:
            detail = f"channels must be an array of strings or null, got {_json_type(channels)}"
            raise Rejected(DeadLetterReason.SCHEMA, detail)
        for j, name in enumerate(channels):
            if type(name) is not str:
                detail = f"channels[{j}] must be a string, got {_json_type(name)}"
                raise Rejected(DeadLetterReason.SCHEMA, detail)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                detail = f"channels[{j}] is not valid Unicode (lone surrogate)"
                raise Rejected(DeadLetterReason.SCHEMA, detail) from None
        if len(channels) != len(values):
            _check_finite(values)
            detail = f"channels has {len(channels)} names for {len(values)} values"
            raise Rejected(DeadLetterReason.WRONG_LENGTH, detail)

    if len(values) != limits.n_channels:
        _check_finite(values)
        detail = f"values has {len(values)} entries, expected {limits.n_channels}"
        raise Rejected(DeadLetterReason.WRONG_LENGTH, detail)
    if not min_ts <= ts <= max_ts:
        _check_finite(values)
        where = f"before ts_min_ms {limits.ts_min_ms}" if ts < min_ts else \
            f"more than {limits.max_future_ms} ms ahead of now ({max_ts - limits.max_future_ms})"
        raise Rejected(DeadLetterReason.BAD_TIMESTAMP, f"ts {ts} is {where}")
    if key is None and limits.require_key:
        _check_finite(values)
        detail = (f"message has no key; it must be the device id {_short(device_id)} (state is partitioned by key; "
                  "LIQUIDSTREAM_REQUIRE_KEY=false accepts keyless readings)")
        raise Rejected(DeadLetterReason.KEY_MISMATCH, detail)
    if key is not None and key != device_key:
        _check_finite(values)
        key_text = bytes(key).decode("utf-8", errors="backslashreplace")
        detail = f"message key {_short(key_text)} != device_id {_short(device_id)}"
        raise Rejected(DeadLetterReason.KEY_MISMATCH, detail)
    return device_id, ts, values, channels
