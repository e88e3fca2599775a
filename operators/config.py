"""Hyperparameters and policies of the step operator, as one frozen value object.

``pipeline`` embeds this dataclass in its pydantic settings (env vars ``LIQUIDSTREAM_OPERATOR__*``), so
the operator never reads the environment itself.  Units: seconds for durations, dimensionless otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from liquidstream.operators.errors import ConfigError

DuplicatePolicy = Literal["drop", "accept"]
LatePolicy = Literal["drop", "accept"]
GapPolicy = Literal["decay", "reset", "clamp"]


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator does with each kind of event, and how it scores readings.

    >>> OperatorSettings().late_policy
    'drop'
    >>> OperatorSettings(max_gap_s=-1.0)
    Traceback (most recent call last):
    ...
    liquidstream.operators.errors.ConfigError: max_gap_s must be > 0, got -1.0
    """

    #: Same device, same event time as an already applied reading: ``drop`` reports it and skips it;
    #: ``accept`` applies it with dt = 0.
    duplicate_policy: DuplicatePolicy = "drop"
    #: Event older than the device's last applied event: ``drop`` reports it; ``accept`` applies it with
    #: dt = 0 (the device clock never moves backwards).
    late_policy: LatePolicy = "drop"
    #: A gap longer than ``max_gap_s``: ``decay`` integrates the full gap (cells relax towards their rest
    #: state), ``reset`` zeroes the hidden state, ``clamp`` integrates only ``max_gap_s``.  Always flagged.
    gap_policy: GapPolicy = "decay"
    max_gap_s: float = 600.0
    #: No alert while a device has applied fewer readings than this (its statistics are still settling).
    warmup_events: int = 20
    #: Adaptive threshold = mean + threshold_sigma * std of the device's recent scores, never below
    #: ``min_threshold``.
    threshold_sigma: float = 6.0
    min_threshold: float = 4.0
    #: Hysteresis: an alert closes once ``exit_after`` consecutive scores are below
    #: ``exit_ratio * threshold``.
    exit_ratio: float = 0.6
    exit_after: int = 5
    #: After an alert closes, no new alert opens on that device for this long (seconds).
    cooldown_s: float = 60.0
    #: An open alert closes after this long even if scores stay high (the new level is accepted as normal).
    max_alert_s: float = 900.0
    #: Sustained deviation: an alert also opens when the short running mean of squared standardised
    #: residuals (smoothing ``sustained_alpha`` per reading) exceeds ``sustained_ratio`` times the device's
    #: long-run mean.  Catches changes that are moderate at every reading but persistent (a frequency change).
    sustained_alpha: float = 0.1
    sustained_ratio: float = 4.0
    #: Level deviation, in standard deviations of the device's normal (frozen-in-alert) statistics: a
    #: reading beyond ``level_sigma`` on any channel opens an alert; an open alert does not calm down while
    #: readings stay beyond ``hold_sigma``.
    level_sigma: float = 8.0
    hold_sigma: float = 3.0
    #: A channel repeating exactly the same value this many readings in a row counts as a stuck sensor.
    stuck_after: int = 8
    #: Smoothing factor of the per-device running statistics (normalisation, score, calibration), per
    #: reading: about 1/alpha readings of memory, which should span a few periods of the slowest rhythm.
    stats_alpha: float = 0.005
    #: A fixed reference (0 = off): after a device's first ``reference_events`` readings its normalisation
    #: scale (per-channel variance) stops learning, so a slow or long anomaly is measured against the spread
    #: seen during commissioning instead of teaching the detector that it is normal.  With
    #: ``reference_level`` the per-channel level (mean) freezes too; otherwise it keeps following slow drift
    #: (at ``stats_alpha``, and never inside an alert).  The reference readings are commissioning data, assumed
    #: normal: the statistics learn from every one of them, even while an alert is open.
    reference_events: int = 0
    reference_level: bool = False
    #: Inside an alert, channels whose reading (smoothed, with ``level_smoothing``) is still within
    #: ``hold_sigma`` of their level keep learning (only the abnormal channels freeze), so a slowly drifting
    #: channel (a warming motor) cannot hold an alert open after the incident ends.
    learn_calm_channels: bool = False
    #: Smoothed level rule (0 = off): the level rule (``level_sigma``, ``hold_sigma``, calm channels) reads an
    #: exponential moving average of each channel (this weight per reading) instead of the raw reading, and
    #: measures its distance from the level in the spread that this smoothed distance itself has on the
    #: device (learnt like ``var``, and frozen with it by ``reference_events``).  Noise averages out but a
    #: slow drift does not: a small persistent shift on a noisy channel stands out, while a channel that
    #: wanders slowly is judged by how far it normally wanders.  Costs 2 float32 per channel of device state,
    #: only when on (see :mod:`liquidstream.operators.smoothed_level`).
    level_smoothing: float = 0.0
    #: When an alert closes (calm again, or after ``max_alert_s``), every channel's level jumps to its current
    #: (smoothed, with ``level_smoothing``) reading: the state the device is in after an incident becomes its
    #: normal at once, instead of being learnt at ``stats_alpha`` while it keeps reopening alerts.  This
    #: overrides ``reference_level`` at that moment; the reference spreads stay as they are.
    rebase_on_close: bool = False
    #: Devices with no event for this long (event time, seconds) are evicted by ``evict_idle``.
    state_ttl_s: float = 24 * 3600.0
    #: Channels named in an alert: the ``top_channels`` with the largest standardised residuals.
    top_channels: int = 3

    def __post_init__(self) -> None:
        positive = {
            "max_gap_s": self.max_gap_s,
            "threshold_sigma": self.threshold_sigma,
            "min_threshold": self.min_threshold,
            "stats_alpha": self.stats_alpha,
            "state_ttl_s": self.state_ttl_s,
            "max_alert_s": self.max_alert_s,
            "sustained_alpha": self.sustained_alpha,
            "sustained_ratio": self.sustained_ratio,
            "level_sigma": self.level_sigma,
            "hold_sigma": self.hold_sigma,
        }
        for name, value in positive.items():
            if not value > 0:
                msg = f"{name} must be > 0, got {value}"
                raise ConfigError(msg)
        if not 0 < self.exit_ratio <= 1:
            msg = f"exit_ratio must be in (0, 1], got {self.exit_ratio}"
            raise ConfigError(msg)
        if not 0 <= self.level_smoothing < 1:
            msg = f"level_smoothing must be in [0, 1), got {self.level_smoothing}"
            raise ConfigError(msg)
        if self.stats_alpha >= 1:
            msg = f"stats_alpha must be < 1, got {self.stats_alpha}"
            raise ConfigError(msg)
        for name, ivalue in (("warmup_events", self.warmup_events), ("exit_after", self.exit_after),
                             ("stuck_after", self.stuck_after), ("top_channels", self.top_channels)):
            if ivalue < 1:
                msg = f"{name} must be >= 1, got {ivalue}"
                raise ConfigError(msg)
        if self.reference_events < 0:
            msg = f"reference_events must be >= 0, got {self.reference_events}"
            raise ConfigError(msg)
        if self.cooldown_s < 0:
            msg = f"cooldown_s must be >= 0, got {self.cooldown_s}"
            raise ConfigError(msg)
