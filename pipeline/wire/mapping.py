"""Input mapping: read an existing JSON shape as readings, without a reshaping job (settings ``mapping``).

Three shapes (``LIQUIDSTREAM_MAPPING__SHAPE`` or ``--shape``):

* ``reading`` (default): liquidstream's own ``{"device_id", "ts", "values": [...]}``; ``device_field``,
  ``time_field`` and ``time_unit`` may rename the first two (``values`` stays an array).
* ``wide``: one object per reading with one named field per channel, e.g. ``{"sensor": "p-7", "time":
  "2026-12-01T10:00:00Z", "temp": 41.2, "rpm": 1480}`` with ``device_field=sensor``, ``time_field=time``,
  ``time_unit=iso8601``, ``channel_fields=temp,rpm`` (the model's channel order; other fields are ignored).
* ``long``: one message per channel reading, ``{"device": "p-7", "ts": ..., "channel": "temp", "value": 41.2}``,
  assembled per device and time into one reading (:mod:`liquidstream.pipeline.wire.assembly`).

``device_field = "@key"`` takes the device id from the message key (Kafka; a replayed file has none).  Time units:
``ms`` (epoch milliseconds, integer, as today), ``s`` (epoch seconds, integer or decimal) or ``iso8601`` (a string
with a zone: ``Z`` or ``+02:00``; none is refused rather than guessed).  Whatever the shape, the reading then goes
through the same checks and dead-letter reasons as a native one
(:func:`~liquidstream.pipeline.wire.checks.check_reading`).

How a mapped message becomes a reading: :mod:`liquidstream.pipeline.wire.reshape`.

>>> InputMapping(shape="wide", channel_fields=("temp", "rpm")).n_channels
2
>>> InputMapping().native
True
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["KEY", "InputMapping"]

#: ``device_field`` value meaning "the message key".
KEY = "@key"


class InputMapping(BaseModel):
    """Which JSON shape the input has and where a reading's parts are in it (env ``LIQUIDSTREAM_MAPPING__*``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``reading`` (liquidstream's own, the default), ``wide`` (one named field per channel) or ``long`` (one
    #: message per channel reading, assembled per device and time; every consumer but the faust app).
    shape: Literal["reading", "wide", "long"] = "reading"
    #: Field holding the device id, or ``@key`` for the Kafka message key.
    device_field: str = Field(default="device_id", min_length=1)
    #: Field holding the event time, in ``time_unit``.
    time_field: str = Field(default="ts", min_length=1)
    #: ``ms`` (epoch milliseconds, integer), ``s`` (epoch seconds, integer or decimal) or ``iso8601`` (with zone).
    time_unit: Literal["ms", "s", "iso8601"] = "ms"
    #: wide: the fields that are the channels, in the model's channel order; long: the channel names, in order.
    #: As JSON in the environment (``'["temp","rpm"]'``), comma-separated on the command line.
    channel_fields: tuple[str, ...] = ()
    #: long: the field naming the channel of a message.
    channel_field: str = Field(default="channel", min_length=1)
    #: long: the field holding the channel's value.
    value_field: str = Field(default="value", min_length=1)
    #: long, from a topic: seconds of a device's event time after which its unfinished reading (channels still
    #: missing) is given up and its parts dead-lettered ``incomplete``; parts arriving older than that, too.
    assembly_window_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _channels_named(self) -> InputMapping:
        if self.shape != "reading" and not self.channel_fields:
            msg = f"mapping shape {self.shape!r} needs channel_fields (--channel-fields a,b,c): the channels, in order"
            raise ValueError(msg)
        if len(set(self.channel_fields)) != len(self.channel_fields):
            msg = f"channel_fields repeats a name: {list(self.channel_fields)}"
            raise ValueError(msg)
        return self

    @property
    def native(self) -> bool:
        """Liquidstream's own shape and names: the codec's fast path applies."""
        return self.shape == "reading" and (self.device_field, self.time_field, self.time_unit) == \
            ("device_id", "ts", "ms")

    @property
    def n_channels(self) -> int | None:
        """Channel count the mapping fixes (wide, long), or None (native: the model's)."""
        return len(self.channel_fields) or None
