"""The wire contract: JSON records the worker consumes and publishes, as pydantic v2 models.

:class:`Reading` is the *documentation* of the native input format (published with the output records by
:mod:`liquidstream.pipeline.wire.contract`) and the reference the codec is tested against.  The worker's hot
path does not build them per message: :func:`liquidstream.pipeline.wire.codec.decode_batch` applies the same rules with
plain type checks and numpy.

Units: ``ts`` and ``forecast_ts`` are epoch **milliseconds** (JSON integers); ``horizon_s`` is seconds.
Values must be finite *as float32* (the dtype the models run in): NaN, infinities and magnitudes that
overflow float32 (``1e300``) are rejected with :attr:`DeadLetterReason.NON_FINITE`.

>>> r = Reading.model_validate({"device_id": "pump-7", "ts": 1_700_000_000_000, "values": [1, 2.5]})
>>> r.values
[1.0, 2.5]
>>> try:
...     Reading.model_validate({"device_id": "pump-7", "ts": 1.5, "values": [1.0]})
... except ValidationError as ex:
...     print(ex.errors()[0]["type"], reason_for(ex))
int_type schema
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: Magnitudes at or above this round to infinity when cast to float32 (half an ulp above float32's max).
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
#: Longest accepted device id, in characters.
MAX_DEVICE_ID_CHARS = 256


class DeadLetterReason(StrEnum):
    """Why a message went to the dead-letter topic.  The values are stable: dashboards and replay tools
    match on them (header ``ls.error.class``)."""

    EMPTY = "empty"  # null or zero-length payload
    OVERSIZE = "oversize"  # payload longer than max_payload_bytes (checked before parsing)
    UNDECODABLE = "undecodable"  # payload is not UTF-8
    MALFORMED_JSON = "malformed_json"  # not JSON (or nested beyond the parser's limits)
    SCHEMA = "schema"  # not an object, missing field, wrong type, empty/blank device id
    NON_FINITE = "non_finite"  # NaN, Infinity, or a value that overflows float32
    WRONG_LENGTH = "wrong_length"  # values length != channel count, or channels length != values length
    BAD_TIMESTAMP = "bad_timestamp"  # ts < ts_min_ms or ts > now + max_future_s
    KEY_MISMATCH = "key_mismatch"  # message key != UTF-8 device_id, or missing (require_key)
    LATE = "late"  # older than the device's last applied event (operator policy)
    DUPLICATE = "duplicate"  # same device and event time as an applied event (operator policy); long shape: a
    # channel of a device and time already read
    INCOMPLETE = "incomplete"  # long shape: the input ended before every channel of this device and time arrived


def describe_non_finite(value: float) -> str | None:
    """Why a wire number is not finite in float32, or None when it is (the one rule codec and model share).

    An int is judged as the float it becomes (``2**128 - 2**103 - 1`` rounds up to the overflow point).

    >>> describe_non_finite(1.5), describe_non_finite(float("-inf")), describe_non_finite(1e300)
    (None, 'is -Infinity', '= 1e+300 overflows float32')
    """
    try:
        number = float(value)
    except OverflowError:
        return "is an integer too large for float32"
    if math.isnan(number):
        return "is NaN"
    if math.isinf(number):
        return f"is {'-' if number < 0 else ''}Infinity"
    if not abs(number) < FLOAT32_OVERFLOW:
        return f"= {number:.6g} overflows float32"
    return None


def _finite_value(value: object) -> object:
    """Reject numbers that are not finite in float32; leave type errors to the strict float check."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        detail = describe_non_finite(value)
        if detail is not None:
            kind, msg = "non_finite", f"value {detail}"
            raise PydanticCustomError(kind, msg)
    return value


#: A sensor value on the wire: a JSON number (ints accepted), never a bool or string, finite in float32.
WireValue = Annotated[StrictFloat, BeforeValidator(_finite_value)]
#: A finite float in an output record.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Reading(BaseModel):
    """One sensor reading, as consumed from the input topic (message key = ``device_id``).

    Extra fields are ignored.  ``channels``, when given, names each value.
    """

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    device_id: str = Field(min_length=1, max_length=MAX_DEVICE_ID_CHARS, description="Device id, not blank.")
    ts: int = Field(description="Event time, epoch milliseconds (JSON integer).")
    values: list[WireValue] = Field(min_length=1, description="One finite number per channel.")
    channels: list[str] | None = Field(default=None, description="Channel names, same length as values.")

    @field_validator("device_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            msg = "device_id is blank"
            raise ValueError(msg)
        return value

    @field_validator("channels")
    @classmethod
    def _valid_unicode(cls, value: list[str] | None) -> list[str] | None:
        for j, name in enumerate(value or ()):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError as ex:
                msg = f"channels[{j}] is not valid Unicode (lone surrogate)"
                raise ValueError(msg) from ex
        return value

    @model_validator(mode="after")
    def _channels_match_values(self) -> Reading:
        if self.channels is not None and len(self.channels) != len(self.values):
            kind, msg = "wrong_length", "channels has {n} names for {m} values"
            raise PydanticCustomError(kind, msg, {"n": len(self.channels), "m": len(self.values)})
        return self


def reason_for(error: ValidationError) -> DeadLetterReason:
    """The dead-letter reason for a failed :class:`Reading` validation, as the codec reports it.

    Any structural error wins (``schema``); otherwise non-finite values, then a channels/values length
    mismatch.

    >>> try:
    ...     Reading.model_validate({"device_id": "d", "ts": 1, "values": [float("nan")]})
    ... except ValidationError as ex:
    ...     print(reason_for(ex))
    non_finite
    """
    types = {err["type"] for err in error.errors()}
    if types <= {"non_finite"}:
        return DeadLetterReason.NON_FINITE
    if types <= {"wrong_length"}:
        return DeadLetterReason.WRONG_LENGTH
    return DeadLetterReason.SCHEMA
