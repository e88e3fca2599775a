"""What the operators' verbs return: the columnar output of one :meth:`LiquidOperator.process` call, and the
counts and decisions of :class:`~liquidstream.operators.online.learner.OnlineLearner`'s ``observe`` and ``learn``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

import numpy as np
import torch


class EventStatus(IntEnum):
    """What the operator did with an event; every value is visible in the result, none is silent."""

    OK = 0
    FIRST = 1  # a device's first reading: initialises its state, has no prior forecast and no score
    DUPLICATE_DROPPED = 2  # same device and event time as an applied reading; not applied
    LATE_DROPPED = 3  # older than the device's last applied reading; not applied
    DUPLICATE_ACCEPTED = 4  # duplicate applied with dt = 0 (duplicate_policy="accept")
    LATE_ACCEPTED = 5  # late reading applied with dt = 0 (late_policy="accept")

    @property
    def applied(self) -> bool:
        return self not in (EventStatus.DUPLICATE_DROPPED, EventStatus.LATE_DROPPED)

    @property
    def label(self) -> str:
        return self.name.lower()


class AlertReason(StrEnum):
    """Why an alert opened.  A string on the wire (``reason`` of an alert record); ``code`` is the int8 the
    fused wave step writes (its position in this enum).

    >>> AlertReason.STUCK_SENSOR.code, AlertReason.from_code(1), AlertReason.LEVEL_DEVIATION == "level_deviation"
    (1, <AlertReason.STUCK_SENSOR: 'stuck_sensor'>, True)
    """

    # Not opened since the anomaly-likelihood detector; kept so that alert records written before it validate.
    FORECAST_DEVIATION = "forecast_deviation"
    STUCK_SENSOR = "stuck_sensor"  # a channel repeated exactly the same value stuck_after readings in a row
    SUSTAINED_DEVIATION = "sustained_deviation"  # not opened any more (see FORECAST_DEVIATION)
    LEVEL_DEVIATION = "level_deviation"  # the level rule's likelihood (reading against the normal level)
    # The anomaly likelihood of the forecast residuals fell below alert_probability.
    ANOMALY_LIKELIHOOD = "anomaly_likelihood"
    # No reading for silence_after_gaps of the device's usual gaps while the stream moved on (score: usual gaps).
    SILENCE = "silence"

    @property
    def code(self) -> int:
        return _REASON_ORDER.index(self)

    @classmethod
    def from_code(cls, code: int) -> AlertReason:
        return _REASON_ORDER[code]


_REASON_ORDER: tuple[AlertReason, ...] = tuple(AlertReason)


def alert_id(device_id: str, opened_ms: int) -> str:
    """The stable id of an alert: its device and the event time of the reading that opened it (a device has
    at most one alert open, so the pair is unique; it survives a restart, being made of event data).

    >>> alert_id("pump-7", 1700000000000)
    'pump-7@1700000000000'
    """
    return f"{device_id}@{opened_ms}"


@dataclass(frozen=True)
class ChannelWhy:
    """One blamed channel of an alert: its index, the reading, the expected value and spread (raw units), and the
    standardised deviation."""

    channel: int
    reading: float
    expected: float
    spread: float
    z: float


@dataclass(frozen=True)
class Explanation:
    """Why an alert opened: its blamed channels and the cell's time constants then (seconds: min, median, max)."""

    channels: tuple[ChannelWhy, ...]
    time_constants_s: tuple[float, float, float]


@dataclass(frozen=True)
class Alert:
    """One incident on one device, reported once when it opens."""

    device_id: str
    ts_ms: int  # event time of the reading that opened it, epoch ms
    score: float
    threshold: float
    severity: str  # "warning" | "critical"
    channels: tuple[int, ...]  # channel indices, largest standardised residual first
    reason: AlertReason
    index: int  # position of the triggering event in the process() input
    explanation: Explanation | None = None  # why (operators/explain.py); None for silences

    @property
    def alert_id(self) -> str:
        return alert_id(self.device_id, self.ts_ms)


@dataclass(frozen=True)
class AlertClosed:
    """The end of an incident, reported once, on the reading that closed it."""

    device_id: str
    opened_ms: int  # event time of the reading that opened it, epoch ms (with device_id: the alert's id)
    ts_ms: int  # event time of the reading that closed it, epoch ms
    peak_score: float  # largest score while it was open, decades
    threshold: float
    severity: str  # of the peak: "warning" | "critical"
    reason: AlertReason  # why it opened
    readings: int  # from the opening reading to the closing one, both included
    max_duration: bool  # closed because it reached max_alert_events (else: calm readings)
    index: int  # position of the closing event in the process() input (-1: no reading closed it)
    #: "" (calm or max_duration), "evicted" (the device's state was evicted, idle for state_ttl_s; ts: its last
    #: reading) or "resumed" (a silence ended by the device's next reading)
    cause: str = ""

    @property
    def closed_by(self) -> str:
        """``calm``, ``max_duration``, ``evicted`` or ``resumed`` (the alert record's ``closed_by``)."""
        return self.cause or ("max_duration" if self.max_duration else "calm")

    @property
    def alert_id(self) -> str:
        return alert_id(self.device_id, self.opened_ms)

    @property
    def duration_ms(self) -> int:
        return self.ts_ms - self.opened_ms


@dataclass(frozen=True)
class StepResult:
    """Per-event arrays in the order of the ``process`` input (N events, C channels).

    ``forecast``/``forecast_std`` are the model's prediction of the device's *next* reading, expected
    ``horizon_s`` seconds after this one (at ``forecast_ts_ms``), in raw units; NaN for events not applied.
    ``score`` is this reading's surprise, ``-log10 p`` of its combined anomaly-likelihood tail probability
    (decades; NaN for first readings and events not applied); ``threshold`` is the score at which an alert
    opens, ``-log10(alert_probability)``; ``anomaly_score`` is the score mapped into [0, 1):
    ``score / (score + 10)`` (NaN where ``score`` is).
    """

    status: np.ndarray  # int8 [N], EventStatus values
    long_gap: np.ndarray  # bool [N]: the gap before this reading exceeded max_gap_s (gap_policy applied)
    forecast: np.ndarray  # float32 [N, C]
    forecast_std: np.ndarray  # float32 [N, C]
    horizon_s: np.ndarray  # float32 [N], seconds
    score: np.ndarray  # float32 [N]
    threshold: np.ndarray  # float32 [N]
    is_alert: np.ndarray  # bool [N]: an alert is open on the device after this reading
    ts_ms: np.ndarray  # int64 [N], echo of the input event times
    anomaly_score: np.ndarray  # float32 [N], in [0, 1)
    alerts: list[Alert] = field(default_factory=list)  # alerts opened, in input order
    closed: list[AlertClosed] = field(default_factory=list)  # alerts closed, in input order

    @property
    def applied(self) -> np.ndarray:
        applied: np.ndarray = (self.status != EventStatus.DUPLICATE_DROPPED) & (self.status != EventStatus.LATE_DROPPED)
        return applied

    @property
    def forecast_ts_ms(self) -> np.ndarray:
        """Event time the forecast is for, epoch ms (int64)."""
        fts: np.ndarray = self.ts_ms + np.round(np.nan_to_num(self.horizon_s) * 1000.0).astype(np.int64)
        return fts

    def __len__(self) -> int:
        return int(self.status.shape[0])

    @classmethod
    def empty(cls, n_channels: int) -> StepResult:
        f = np.zeros((0, n_channels), np.float32)
        z = np.zeros(0, np.float32)
        return cls(np.zeros(0, np.int8), np.zeros(0, bool), f, f.copy(), z, z.copy(), z.copy(),
                   np.zeros(0, bool), np.zeros(0, np.int64), z.copy())


@dataclass(frozen=True)
class UpdateDecision:
    """What ``learn`` (or ``check_rollback``) decided; ``state_dict`` holds CPU tensors when accepted."""

    accepted: bool
    reason: str  # accepted | buffer_too_small | no_improvement | drift_exceeded | no_terms | rollback
    state_dict: dict[str, torch.Tensor] | None
    figures: dict[str, float] = field(default_factory=dict)
    version: str | None = None  # rollback: the version of the weights handed back


@dataclass(frozen=True)
class ObserveStats:
    """Counts of one ``observe`` call."""

    events: int
    applied: int  # applied by the shadow operator (first or ok)
    learnable: int  # applied and let through by the alert guard
    windows_completed: int
    windows_kept: int  # went to the buffer (training or held out)
    windows_dropped: int  # too many masked readings, or no loss term
    buffer_windows: int
