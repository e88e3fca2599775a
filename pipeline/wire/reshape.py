"""How a message of a mapped shape becomes a native reading object (see :mod:`liquidstream.pipeline.wire.mapping`).

The result goes through :func:`~liquidstream.pipeline.wire.checks.check_reading` like any native reading, so every
shape meets the same checks and dead-letter reasons; what is specific to a mapping (a missing mapped field, a time
in the wrong unit, an ISO 8601 time without zone, no key where the key is the device id) is rejected here.

>>> m = InputMapping(shape="wide", device_field="sensor", time_field="time", time_unit="iso8601",
...                  channel_fields=("temp", "rpm"))
>>> to_reading(m, {"sensor": "p-7", "time": "2026-12-01T10:00:00Z", "temp": 41.2, "rpm": 1480}, None)
{'device_id': 'p-7', 'ts': 1796119200000, 'values': [41.2, 1480], 'channels': ['temp', 'rpm']}
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from liquidstream.pipeline.wire.checks import NUMBER_TYPES, Rejected
from liquidstream.pipeline.wire.mapping import KEY, InputMapping
from liquidstream.pipeline.wire.schemas import DeadLetterReason

__all__ = ["event_time_ms", "long_part", "to_reading"]


def event_time_ms(value: Any, unit: str, name: str) -> int:
    """Epoch ms of a time field; raises ``Rejected`` (``schema``) naming the field and what it expected.

    >>> event_time_ms(1767225600.5, "s", "time"), event_time_ms("2026-01-01T00:00:00+01:00", "iso8601", "t")
    (1767225600500, 1767222000000)
    """
    if unit == "ms":
        if type(value) is not int:
            raise Rejected(DeadLetterReason.SCHEMA, f"{name} must be an integer (epoch ms), got {value!r:.40}")
        return int(value)
    if unit == "s":
        if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > 1e13:
            raise Rejected(DeadLetterReason.SCHEMA, f"{name} must be a number (epoch seconds), got {value!r:.40}")
        return round(float(value) * 1000)
    if type(value) is not str:
        raise Rejected(DeadLetterReason.SCHEMA, f"{name} must be an ISO 8601 string, got {value!r:.40}")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected(DeadLetterReason.SCHEMA, f"{name} {value[:40]!r} is not ISO 8601") from None
    if when.tzinfo is None:
        detail = f"{name} {value[:40]!r} has no zone (add Z or +HH:MM)"
        raise Rejected(DeadLetterReason.SCHEMA, detail)
    return round(when.timestamp() * 1000)


def _device_from_key(key: bytes | None) -> str:
    if key is None:
        raise Rejected(DeadLetterReason.KEY_MISMATCH, "message has no key; the device id is the key (@key)")
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(DeadLetterReason.KEY_MISMATCH, "message key is not UTF-8 (device_field=@key)") from None


def _required(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise Rejected(DeadLetterReason.SCHEMA, f"{name} is missing")
    return obj[name]


def to_reading(mapping: InputMapping, obj: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """A parsed message of the ``reading`` or ``wide`` shape as a native reading object (for ``check_reading``).

    A missing field is a ``schema`` reject naming it; the device id's and values' own checks come after.
    """
    device = _device_from_key(key) if mapping.device_field == KEY else _required(obj, mapping.device_field)
    ts = event_time_ms(_required(obj, mapping.time_field), mapping.time_unit, mapping.time_field)
    if mapping.shape == "reading":
        return {"device_id": device, "ts": ts, "values": obj.get("values"), "channels": obj.get("channels")}
    values = [_required(obj, f) for f in mapping.channel_fields]
    for name, value in zip(mapping.channel_fields, values, strict=True):
        if type(value) not in NUMBER_TYPES:
            raise Rejected(DeadLetterReason.SCHEMA, f"{name} must be a number, got {value!r:.40}")
    return {"device_id": device, "ts": ts, "values": values, "channels": list(mapping.channel_fields)}


def long_part(mapping: InputMapping, obj: dict[str, Any], key: bytes | None) -> tuple[Any, int, int, Any]:
    """Device, event time (ms), channel position and value of one message of the ``long`` shape."""
    device = _device_from_key(key) if mapping.device_field == KEY else _required(obj, mapping.device_field)
    ts = event_time_ms(_required(obj, mapping.time_field), mapping.time_unit, mapping.time_field)
    channel, value = _required(obj, mapping.channel_field), _required(obj, mapping.value_field)
    if channel not in mapping.channel_fields:
        detail = f"{mapping.channel_field} {channel!r:.40} is not one of channel_fields {list(mapping.channel_fields)}"
        raise Rejected(DeadLetterReason.SCHEMA, detail)
    if type(value) not in NUMBER_TYPES:
        raise Rejected(DeadLetterReason.SCHEMA, f"{mapping.value_field} must be a number, got {value!r:.40}")
    return device, ts, mapping.channel_fields.index(channel), value
