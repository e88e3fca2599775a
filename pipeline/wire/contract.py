"""The published output contract: the records liquidstream writes (Kafka, replay, demo), as pydantic models.

``liquidstream schema {reading,prediction,alert,dead-letter}`` prints :func:`json_schema` of each; the same files
are in ``docs/schemas/`` (a test keeps them equal).  Every Kafka record the worker produces carries the headers
:func:`schema_headers` gives (``ls.schema`` = the schema's name, ``ls.schema.version`` = :data:`SCHEMA_VERSION`).

Where a record came from is its ``source``: the input message's Kafka coordinates (:class:`Source`), or the
input file and line in a file replay (:class:`FileSource`); the demo has no input file and names its simulated
stream (``file`` = ``"demo:simulator"``, ``line`` = position in the stream, 1-based).

>>> sorted(SCHEMAS)
['alert', 'dead-letter', 'prediction', 'reading']
>>> "ok+long_gap" in STATUS_VALUES, "gap_reset" in STATUS_VALUES
(True, False)
>>> schema_headers("alert")
[('ls.schema', b'alert'), ('ls.schema.version', b'2')]
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from liquidstream.operators.result import AlertReason, EventStatus
from liquidstream.pipeline.wire.schemas import DeadLetterReason, FiniteFloat, Reading
from liquidstream.pipeline.wire.types import Headers

__all__ = ["HEADER_SCHEMA", "HEADER_SCHEMA_VERSION", "SCHEMAS", "SCHEMA_VERSION", "STATUS_VALUES", "AlertRecord",
           "DeadLetterRecord", "FileSource", "PredictionRecord", "Source", "json_schema", "schema_headers"]

#: Version of every published schema; bumped on any change a consumer could notice.
SCHEMA_VERSION = 2  # 2: alert reason "silence", closed_by "evicted" and "resumed"
HEADER_SCHEMA = "ls.schema"
HEADER_SCHEMA_VERSION = "ls.schema.version"

#: Every ``status`` a prediction can carry: the applied EventStatus labels, and ``ok+long_gap``.  Only an ``ok``
#: reading can follow a long gap: a first reading has no gap, an accepted late or duplicate one has dt = 0.
STATUS_VALUES: tuple[str, ...] = (*(s.label for s in EventStatus if s.applied), "ok+long_gap")
_STATUS_MEANING = {
    "ok": "applied after the device's previous reading",
    "first": "the device's first reading: initialises its state; no score",
    "duplicate_accepted": "same time as an applied reading, applied with dt = 0 (duplicate_policy=accept)",
    "late_accepted": "older than the last applied reading, applied with dt = 0 (late_policy=accept)",
    "ok+long_gap": "applied after a gap longer than operator max_gap_s (gap_policy applied)",
}
_REASON_MEANING = {
    "stuck_sensor": "a channel repeated exactly the same value stuck_after readings in a row",
    "level_deviation": "the reading is improbable against the device's normal level (level_rule)",
    "anomaly_likelihood": "the tail probability of the forecast residuals fell below alert_probability",
    "forecast_deviation": "not opened any more; kept so that older records validate",
    "sustained_deviation": "not opened any more; kept so that older records validate",
    "silence": "no reading for silence_after_gaps of the device's usual gaps while the stream moved on (score and "
               "threshold then count usual gaps, ts is the instant the silence began, channels are empty)",
}


def _listing(values: Any, meaning: dict[str, str]) -> str:
    return "; ".join(f'"{v}": {meaning.get(str(v), "see the enum in the source")}' for v in values)


class Source(BaseModel):
    """Kafka coordinates of the input message behind a record."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str = Field(description="Input topic.")
    partition: int = Field(ge=0, description="Input partition.")
    offset: int = Field(ge=0, description="Offset of the input message in its partition.")


class FileSource(BaseModel):
    """Input file and line behind a record of a file replay (or the demo's simulated stream)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str = Field(min_length=1, description='Input file as given on the command line, or "demo:simulator".')
    line: int = Field(ge=1, description="1-based line number in the file (position in the stream for the demo).")


_SOURCE = "Where the input came from: Kafka coordinates, or file and line (replay, demo)."


class PredictionRecord(BaseModel):
    """One forecast per applied reading, published to the predictions topic (key = ``device_id``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str = Field(min_length=1, description="Device id of the reading.")
    ts: int = Field(description="Event time of the reading, epoch ms.")
    forecast: list[FiniteFloat] = Field(min_length=1, description="Expected values of the device's next reading, "
                                                                  "one per channel, in the reading's units.")
    forecast_std: list[FiniteFloat] = Field(min_length=1, description="Predictive standard deviation per channel, "
                                                                      "same units as forecast (>= 0).")
    forecast_ts: int = Field(description="Epoch ms the forecast is for: the device's expected next reading.")
    horizon_s: FiniteFloat = Field(ge=0, description="forecast_ts - ts, seconds.")
    score: FiniteFloat | None = Field(description="Surprise of this reading in decades (>= 0): -log10 of the "
                                                  "calibrated tail probability of its forecast residuals on this "
                                                  "device; null for the device's first reading.")
    anomaly_score: FiniteFloat | None = Field(
        ge=0.0, le=1.0, description="How unusual this reading is for this device, in [0, 1]: score / (score + 10) "
                                    "(0.5 at a tail probability of 1e-10); null for the device's first reading.")
    threshold: FiniteFloat | None = Field(description="score at which an alert opens on this device, decades: "
                                                      "-log10(operator alert_probability), 4 by default.")
    is_alert: bool = Field(description="true while an alert is open on the device, right after this reading.")
    status: str = Field(json_schema_extra={"enum": list(STATUS_VALUES)},
                        description="What the operator did with the reading. " + _listing(STATUS_VALUES,
                                                                                          _STATUS_MEANING) + ".")
    model_version: str = Field(description='Version of the model that forecast: 12 hex digits of its weights\' '
                                           'SHA-256, or "untrained".')
    source: Source | FileSource = Field(description=_SOURCE)

    @field_validator("status")
    @classmethod
    def _known_status(cls, value: str) -> str:
        if value not in STATUS_VALUES:
            msg = f"status {value!r} is not one of {', '.join(STATUS_VALUES)}"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _forecast_lengths(self) -> PredictionRecord:
        if len(self.forecast) != len(self.forecast_std):
            msg = f"forecast has {len(self.forecast)} values but forecast_std {len(self.forecast_std)}"
            raise ValueError(msg)
        return self


class BlamedChannel(BaseModel):
    """One channel an alert blames, at the reading that opened it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channel: str = Field(description='The channel\'s name, or "ch0", "ch1", ... when the reading had none.')
    reading: FiniteFloat = Field(description="The reading's value, raw units.")
    expected: FiniteFloat = Field(description="What the detector measured the reading against, from the state before "
                                              "it: the forecast at its real gap, the absolute forecast or the normal "
                                              "level, whichever deviated most in the detector's units; raw units.")
    spread: FiniteFloat = Field(ge=0, description="The scale of that deviation (the likelihood's residual scale), "
                                                  "raw units.")
    z: FiniteFloat | None = Field(description="|reading - expected| / spread: the standardised deviation the "
                                              "detector saw. null: a stuck channel (a repeated value, not a "
                                              "deviation).")


class TimeConstants(BaseModel):
    """The cell's effective time constants at the alert, seconds: how fast the device's state forgets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: FiniteFloat = Field(ge=0, description="Fastest hidden unit, seconds.")
    median: FiniteFloat = Field(ge=0, description="Median hidden unit, seconds.")
    max: FiniteFloat = Field(ge=0, description="Slowest hidden unit, seconds.")


class Explanation(BaseModel):
    """Why an alert opened (opened records of reading alerts; absent on silences and closed records)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: AlertReason = Field(description="The rule or score that opened it (= reason).")
    channels: list[BlamedChannel] = Field(description="The blamed channels, largest standardised deviation first.")
    time_constants_s: TimeConstants = Field(description="The cell's effective time constants (seconds) at the "
                                                        "reading, from the device's state at the end of the batch "
                                                        "that opened the alert.")


class AlertRecord(BaseModel):
    """An anomaly alert's lifecycle on the alerts topic (key = ``device_id``): one incident is one ``opened``
    record when it opens and one ``closed`` record, with the same ``alert_id``, on the reading that closes it
    (after ``exit_after`` calm readings, or ``max_alert_events`` readings open).  Exactly once like every output,
    across restarts: an alert open at a restart is closed once by the worker that restores its device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: Literal["opened", "closed"] = Field(description='"opened": the alert starts on this reading; "closed": '
                                                           'it ends on this reading.')
    alert_id: str = Field(min_length=1, description='Stable id of the alert: "<device_id>@<opened_ts>" (the same in '
                                                     'its opened and closed records, and across restarts).')
    device_id: str = Field(min_length=1, description="Device the alert is about.")
    ts: int = Field(description="Event time of the reading that opened (opened) or closed (closed) the alert, "
                                "epoch ms.")
    score: FiniteFloat = Field(description="opened: score of that reading; closed: the largest score while the alert "
                                           "was open (its peak). Decades (-log10 of the tail probability); reason "
                                           "silence: usual gaps without a reading (closed: until the reading that "
                                           "ended it).")
    threshold: FiniteFloat = Field(description="The device's alert threshold, decades (the score exceeded it); "
                                               "reason silence: silence_after_gaps.")
    severity: Literal["warning", "critical"] = Field(
        description='"critical" when score >= 2 x threshold (tail probability below alert_probability squared), '
                    'else "warning" (closed: of the peak).')
    reason: AlertReason = Field(description="Why the alert opened. " + _listing(AlertReason, _REASON_MEANING) + ".")
    channels: list[str] = Field(description='opened: most anomalous channels, largest standardised residual first: '
                                            'the reading\'s channel names, or "ch0", "ch1", ... when it had none; '
                                            'closed: empty.')
    model_version: str = Field(description="Version of the model that scored the reading.")
    source: Source | FileSource = Field(description=_SOURCE)
    explanation: Explanation | None = Field(default=None, description="opened, on a reading: why (per blamed "
                                                                      "channel, and the cell's time constants).")
    opened_ts: int | None = Field(default=None, description="closed only: event time of the opening reading, epoch ms.")
    duration_ms: int | None = Field(default=None, ge=0, description="closed only: ts - opened_ts, ms of event time.")
    readings: int | None = Field(default=None, ge=1, description="closed only: readings from the opening one to the "
                                                                 "closing one, both included.")
    closed_by: Literal["calm", "max_duration", "evicted", "resumed"] | None = Field(
        default=None, description='closed only: "calm" (exit_after calm readings in a row), "max_duration" '
                                  '(max_alert_events readings open: the new state is accepted as normal) or '
                                  '"evicted" (the device was idle for state_ttl_s and its state dropped: ts is its '
                                  'last reading, source the input position where the worker decided it) or "resumed" '
                                  '(a silence ended by the device\'s next reading; readings is 1).')

    @model_validator(mode="after")
    def _lifecycle_fields(self) -> AlertRecord:
        closing = (self.opened_ts, self.duration_ms, self.readings, self.closed_by)
        if self.event == "closed" and any(v is None for v in closing):
            msg = "a closed record needs opened_ts, duration_ms, readings and closed_by"
            raise ValueError(msg)
        if self.event == "opened" and any(v is not None for v in closing):
            msg = "opened_ts, duration_ms, readings and closed_by belong to closed records only"
            raise ValueError(msg)
        return self


class DeadLetterRecord(BaseModel):
    """Why an input was not applied.  On Kafka: the ``ls.*`` headers of the dead letter (whose value and key are the
    original message's, unchanged), read as this object by
    :func:`~liquidstream.pipeline.wire.dead_letters.dead_letter_record`; in a replay: one line of ``invalid.jsonl``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: DeadLetterReason = Field(description="Stable class of the failure (header ls.error.class): "
                                                 + ", ".join(r.value for r in DeadLetterReason) + ".")
    detail: str = Field(description="Human-readable detail naming the field (header ls.error.reason, <= 1 KiB).")
    source: Source | FileSource = Field(description=_SOURCE)
    line: int | None = Field(default=None, ge=1, description="Replay only: 1-based line number (= source.line).")
    failed_at: int | None = Field(default=None, description="Kafka only: wall-clock time of the failure, epoch ms.")
    worker: str | None = Field(default=None, description="Kafka only: id of the worker that rejected it.")
    truncated: dict[str, Any] | None = Field(default=None, description="Kafka only: what was cut to fit the record "
                                                                        "size (ls.truncated), with sha256 digests.")
    headers_unreadable: str | None = Field(default=None, description="Kafka only: why the original headers were "
                                                                     "not forwarded.")


#: ``liquidstream schema NAME`` -> the model.
SCHEMAS: dict[str, type[BaseModel]] = {"reading": Reading, "prediction": PredictionRecord, "alert": AlertRecord,
                                       "dead-letter": DeadLetterRecord}


def json_schema(name: str) -> dict[str, Any]:
    """The published JSON Schema (draft 2020-12) of ``name``, with its id and version."""
    body = SCHEMAS[name].model_json_schema()
    head = {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"urn:liquidstream:schema:{name}:{SCHEMA_VERSION}", "x-schema-version": SCHEMA_VERSION}
    return head | body


def schema_headers(name: str) -> Headers:
    """The Kafka headers naming a record's schema and version."""
    return [(HEADER_SCHEMA, name.encode("ascii")), (HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode("ascii"))]
