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
StepPath = Literal["auto", "tensor", "compiled"]


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
    #: Commissioning: a device's first ``commissioning_events`` readings are normal operation by assumption
    #: (0 = none).  Every statistic learns from all of them, even while the likelihood is high, and no alert
    #: opens during them; after them the normalisation scale (per-channel variance) freezes, so a slow or
    #: long anomaly is measured against the spread seen during commissioning instead of teaching the
    #: detector that it is normal (the level keeps following slow drift at ``stats_alpha``, never inside an
    #: alert).  ``LiquidOperator.set_commissioning`` overrides the length per device.
    commissioning_events: int = 0
    #: The one alert knob: a calibrated tail probability per reading.  An alert opens when the anomaly
    #: likelihood's tail probability ``p`` of a reading falls below it, so it is roughly the expected share of
    #: normal readings that open a false alert (1e-4: about one per 10,000 normal readings and device, before
    #: hysteresis and cooldown thin them further).  The reported ``score`` is ``-log10 p`` (decades of
    #: surprise) and ``threshold`` is ``-log10 alert_probability``; a reading counts as calm once ``p`` exceeds
    #: ``100 * alert_probability``.
    alert_probability: float = 1e-4
    #: Triggers.  ``model_triggers``: the anomaly likelihood of the forecaster's residuals (the delta forecast
    #: and, when the model has one, the absolute forecast) opens alerts.  ``level_rule``: the level
    #: likelihood (the same machinery on the residual against the device's normal level, i.e. its normalised
    #: reading) joins it; measured on NAB and SKAB it lowered both scores when added to the model, hence off
    #: by default.  ``stuck_rule``: a channel repeating exactly the same value ``stuck_after`` readings in a
    #: row opens a ``stuck_sensor`` alert, unless the channel already repeated values for half as long during
    #: the device's commissioning (a quantised counter or a flat line repeats legitimately: the rule learns
    #: that and leaves the channel alone).  ``model_triggers=False, level_rule=True`` is the rules-only
    #: ablation; ``level_rule=False, stuck_rule=False`` the model-only one.
    model_triggers: bool = True
    level_rule: bool = False
    stuck_rule: bool = True
    #: An open alert closes after ``exit_after`` consecutive calm readings, or after ``max_alert_events``
    #: readings open (the new state is then accepted as normal: the statistics learn from it again).  After
    #: a close no alert opens on the device for ``cooldown_events`` readings.  All three count readings (not
    #: event time), as the likelihood's own memory does.
    exit_after: int = 10
    max_alert_events: int = 500
    cooldown_events: int = 100
    #: A channel repeating exactly the same value this many readings in a row counts as a stuck sensor
    #: (see ``stuck_rule``; a stuck channel is always reported with infinite ``z``).
    stuck_after: int = 8
    #: Smoothing factor of the per-device normalisation (running mean and variance) and of the model-spread
    #: calibration, per reading: about 1/alpha readings of memory, which should span a few periods of the
    #: slowest rhythm.
    stats_alpha: float = 0.005
    #: Devices with no event for this long (event time, seconds) are evicted by ``evict_idle``.
    state_ttl_s: float = 24 * 3600.0
    #: Channels named in an alert: the ``top_channels`` with the largest standardised residuals.
    top_channels: int = 3
    #: A device that has not read for this many of its usual gaps (learnt per device: a gap longer than about
    #: 97% of its gaps) while the stream moved on opens a ``silence`` alert, closed by its next reading
    #: (:mod:`liquidstream.operators.silence`); 0 turns silence alerts off.
    silence_after_gaps: float = 10.0
    #: How a batch is computed (same results either way, to float32 rounding): ``tensor`` runs one wave of tensor
    #: operations per reading rank over all devices (fast when a batch holds many devices); ``compiled`` runs each
    #: device's readings in one compiled loop (numba; fast when a batch holds many readings of few devices);
    #: ``auto`` picks per batch by its readings per device (``COMPILED_MIN_READINGS_PER_DEVICE``).  The compiled
    #: step runs on the CPU only, for the CfC (default mode), Liquid and LTC cells; elsewhere the tensor path runs.
    step_path: StepPath = "auto"

    def __post_init__(self) -> None:
        if not self.silence_after_gaps >= 0:
            msg = f"silence_after_gaps must be >= 0 (0: off), got {self.silence_after_gaps}"
            raise ConfigError(msg)
        positive = {"max_gap_s": self.max_gap_s, "stats_alpha": self.stats_alpha, "state_ttl_s": self.state_ttl_s}
        for name, value in positive.items():
            if not value > 0:
                msg = f"{name} must be > 0, got {value}"
                raise ConfigError(msg)
        if self.stats_alpha >= 1:
            msg = f"stats_alpha must be < 1, got {self.stats_alpha}"
            raise ConfigError(msg)
        if not 0 < self.alert_probability < 0.01:  # calm means p > 100 * alert_probability: must stay below 1
            msg = f"alert_probability must be in (0, 0.01), got {self.alert_probability}"
            raise ConfigError(msg)
        for name, ivalue in (("warmup_events", self.warmup_events), ("exit_after", self.exit_after),
                             ("stuck_after", self.stuck_after), ("top_channels", self.top_channels),
                             ("max_alert_events", self.max_alert_events)):
            if ivalue < 1:
                msg = f"{name} must be >= 1, got {ivalue}"
                raise ConfigError(msg)
        for name, ivalue in (("commissioning_events", self.commissioning_events),
                             ("cooldown_events", self.cooldown_events)):
            if ivalue < 0:
                msg = f"{name} must be >= 0, got {ivalue}"
                raise ConfigError(msg)
        if self.step_path not in ("auto", "tensor", "compiled"):
            msg = f"step_path must be one of auto, tensor, compiled, got {self.step_path!r}"
            raise ConfigError(msg)
        if not (self.model_triggers or self.level_rule):
            msg = "at least one of model_triggers and level_rule must be on (they make the anomaly score)"
            raise ConfigError(msg)
