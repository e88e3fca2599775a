"""Anomaly scoring and the per-device alert state machine (adaptive threshold, hysteresis, cooldown).

A reading is scored against the forecast made *before* it arrived: the score is the largest standardised
residual ``|x - mean| / std`` over channels (a spike on one channel of eight is not averaged away).  The
threshold adapts per device: ``score_mean + threshold_sigma * score_std`` of the device's own recent
calm scores, never below ``min_threshold``.  One incident gives one alert:

* an alert **opens** when the score crosses the threshold (or a channel is stuck, or residuals stay
  several times larger than usual for a while), the device is past
  warm-up and not cooling down;
* it **stays open** until ``exit_after`` consecutive readings are calm: score below ``exit_ratio *
  threshold`` (hysteresis) *and* back within ``hold_sigma`` of the device's normal level, so a collective
  anomaly (a valve stuck shut) stays one open alert for as long as it lasts; or until ``max_alert_s``
  passes (the new level is then accepted as normal);
* after it closes, no alert opens on that device for ``cooldown_s``;
* the running statistics do not learn from readings inside an alert, so an incident cannot teach the
  detector that it is normal (with ``learn_calm_channels``, channels still near their level keep learning).

Everything here is vectorised over the rows of one wave (one reading per device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liquidstream.operators.config import OperatorSettings


@dataclass
class AlertState:
    """Per-row alert fields of one wave (views gathered from the state store)."""

    open: torch.Tensor  # bool [B]
    since_ms: torch.Tensor  # int64 [B], event time the open alert began
    cooldown_ms: torch.Tensor  # int64 [B], no alert opens before this event time
    calm: torch.Tensor  # int32 [B], consecutive calm readings while open


@dataclass
class AlertStep:
    """What one wave did to the alert state."""

    state: AlertState
    opened: torch.Tensor  # bool [B]: this reading opened an alert
    in_alert: torch.Tensor  # bool [B]: an alert is open after this reading
    learn: torch.Tensor  # bool [B]: statistics may learn from this reading

    @property
    def closed(self) -> torch.Tensor:
        """bool [B]: an alert was open at this reading and closed on it (``learn`` is False only while open)."""
        return ~self.learn & ~self.in_alert


class AnomalyScorer:
    """Scores readings and runs the alert state machine.

    >>> scorer = AnomalyScorer(OperatorSettings(min_threshold=3.0, exit_after=2, cooldown_s=10.0))
    >>> score, _ = scorer.score(torch.tensor([[0.0, 5.0]]), torch.zeros(1, 2), torch.ones(1, 2))
    >>> score.tolist()
    [5.0]
    >>> state = AlertState(torch.tensor([False]), torch.zeros(1, dtype=torch.long),
    ...                    torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.int32))
    >>> thr = torch.tensor([3.0])
    >>> events = []
    >>> for t, s in enumerate([1.0, 9.0, 8.0, 1.0, 1.0, 9.0]):
    ...     step = scorer.step(state, torch.tensor([s]), thr, torch.tensor([False]),
    ...                        torch.tensor([t * 1000]), warm=torch.tensor([True]))
    ...     state = step.state
    ...     events.append((int(step.opened), int(step.in_alert)))
    >>> events  # one alert for the 9, 8 burst; closed after 2 calm readings; the last 9 is in cooldown
    [(0, 0), (1, 1), (0, 1), (0, 1), (0, 0), (0, 0)]
    """

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings

    def score(self, x_z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channel_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Score [B] and per-channel |standardised residual| [B, C] of normalised readings ``x_z``
        (``channel_dim=0``: inputs and residuals [C, B], channels first)."""
        z = ((x_z - mean) / std).abs()
        return z.amax(dim=channel_dim), z

    def threshold(self, score_mean: torch.Tensor, score_var: torch.Tensor) -> torch.Tensor:
        s = self.settings
        adaptive = score_mean + s.threshold_sigma * torch.sqrt(torch.clamp(score_var, min=0.0))
        return torch.clamp(adaptive, min=s.min_threshold)

    def step(self, state: AlertState, score: torch.Tensor, threshold: torch.Tensor, condition: torch.Tensor,
             ts_ms: torch.Tensor, warm: torch.Tensor, hold: torch.Tensor | None = None) -> AlertStep:
        """Advance the state machine by one reading per row; NaN scores (first readings) never trigger.

        ``condition`` [B] bool: an abnormal condition that triggers whatever the score (a stuck channel, a
        sustained deviation) and keeps an open alert from calming down; ``hold`` [B] bool only keeps an
        open alert from calming down (the reading is still away from the device's normal level).
        """
        s = self.settings
        trigger = (score > threshold) | condition
        opened = trigger & ~state.open & warm & (ts_ms >= state.cooldown_ms)
        is_open = state.open | opened
        since = torch.where(opened, ts_ms, state.since_ms)
        calm_now = (score < s.exit_ratio * threshold) & ~condition
        if hold is not None:
            calm_now = calm_now & ~hold
        calm = torch.where(is_open & calm_now & ~opened, state.calm + 1, torch.zeros_like(state.calm))
        expired = ts_ms - since > int(s.max_alert_s * 1000)
        closing = is_open & ~opened & ((calm >= s.exit_after) | expired)
        still_open = is_open & ~closing
        cooldown = torch.where(closing, ts_ms + int(s.cooldown_s * 1000), state.cooldown_ms)
        calm = torch.where(closing, torch.zeros_like(calm), calm)
        new_state = AlertState(still_open, since, cooldown, calm)
        return AlertStep(new_state, opened, still_open, learn=~is_open)

    @staticmethod
    def severity(score: float, threshold: float) -> str:
        """``critical`` when the score is at least twice the threshold, else ``warning``."""
        return "critical" if score >= 2.0 * threshold else "warning"
