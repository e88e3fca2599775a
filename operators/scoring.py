"""The anomaly likelihood of a residual stream and the per-device alert state machine.

**Anomaly likelihood** (after NAB's, with O(1) state per device and residual).  A reading's residual ``r``
[C] against a forecast (normalised units: the delta forecast, the absolute forecast, or the device's
normal level) becomes a tail probability in three steps:

* raw surprise ``a = max_c log(1 + r_c^2 / s2_c)``, ``s2_c`` the running mean of ``r_c^2`` (winsorised at
  ``S2_CLIP s2_c``, floored at ``S2_FLOOR``): the largest channel, so one abnormal channel of eight is not
  averaged away; the log keeps quantised or spiky channels from dominating;
* short mean ``m += SHORT_ALPHA (a - m)`` (about ten readings): a moderate but persistent change (a
  frequency change, a collective anomaly) adds up where single readings do not stand out;
* ``p = Q((m - mu) / sqrt(v))``, the Gaussian upper tail of ``m`` against its own long-run mean ``mu`` and
  variance ``v`` (learning rate ``max(LONG_ALPHA, 1/(n+1))``), times an empirical calibration: ``cal``, the
  running rate (memory ``1/CAL_ALPHA`` readings) of calm readings with ``p < CAL_P``, divided by
  ``CAL_P`` floored at 1 (a heavy-tailed device, whose Gaussian tail is too thin, becomes more
  conservative; none becomes more sensitive), the product capped at 1.

The operator combines its likelihoods with a Bonferroni correction, ``p = min(1, k min_k p_k)``, and works in
``log10 p`` (``torch.special.log_ndtr`` keeps the far tail exact): its score is ``-log10 p``.

**Alerts** (one incident gives one alert): an alert **opens** when ``p < alert_probability`` (or a rule's
condition holds), the device is past warm-up and commissioning and not cooling down; a reading is **calm**
when ``p > 100 alert_probability`` and no condition holds; an open alert **closes** after ``exit_after``
consecutive calm readings, or ``max_alert_events`` readings after it opened (the new state is then accepted
as normal); after a close no alert opens for ``cooldown_events`` readings.  Statistics learn only from
readings outside alerts, so an incident cannot teach the detector that it is normal.

Everything here is elementwise over the rows of one wave (one reading per device), channels first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from liquidstream.operators.config import OperatorSettings

#: Weight of a reading in the short mean of the raw surprise (about 10 readings: NAB likelihood's window).
SHORT_ALPHA = 0.1
#: Floor of the long-run learning rate of the likelihood statistics, per reading (about 2,000 readings).  A
#: shorter memory lets a calm stretch shrink the variance so that the next routine burst looks rare: measured
#: with 500 readings of memory against 2,000 and 5,000, NAB standard 50.9 / 51.4 / 51.0 (false detections
#: 321 / 258 / 254), SKAB F1 0.735 / 0.738, demo precision 0.915 / 0.926 (NAB chose; SKAB and the demo checked).
LONG_ALPHA = 0.0005
#: Floor of the running squared residual, normalised units squared (1% of the device's spread).
S2_FLOOR = 1e-4
#: ``s2`` learns from the squared residual winsorised at this many times itself (5 standard deviations): a
#: single wild reading that opens no alert (the first reading of a level shift, a device still learning)
#: would otherwise inflate ``s2`` for hundreds of readings and blind the likelihood (a 60-sigma step seen at
#: the 80th reading raised ``s2`` from about 2 to about 40).
S2_CLIP = 25.0
#: Calibration: the tail probability whose observed rate is tracked, that rate's memory (readings), and the
#: smallest calibration factor.  The floor of 1 means calibration only ever makes a device more conservative:
#: tail hits come in clusters (``m`` is autocorrelated over ~10 readings), so a calm stretch without one drove
#: the prototype's factor (floor 1e-4) towards 0, multiplying every p by it.  Measured: on white noise 17.5 %
#: of readings fell below p = 0.01 with the low floor, 1.4 % with this one; demo precision 0.82 -> 0.94.
CAL_P = 0.01
CAL_ALPHA = 0.0005
CAL_FLOOR = 1.0
#: A likelihood reports p = 1 until it has learnt from this many readings.
MIN_READINGS = 10
#: A reading is calm when p exceeds the alert probability by this factor (hysteresis).
CALM_RATIO = 100.0
LOG10_CAL_P = math.log10(CAL_P)
_LN10 = math.log(10.0)


@dataclass
class Likelihood:
    """One anomaly likelihood's per-device state in a wave: ``s2`` [C, B] (normalised units squared),
    ``m``, ``mu``, ``v``, ``cal`` [B] (the fields ``{key}_*`` of the state store)."""

    s2: torch.Tensor
    m: torch.Tensor
    mu: torch.Tensor
    v: torch.Tensor
    cal: torch.Tensor

    @classmethod
    def of(cls, field: Callable[[str], torch.Tensor], key: str) -> Likelihood:
        return cls(*(field(f"{key}_{name}") for name in ("s2", "m", "mu", "v", "cal")))

    def items(self, key: str) -> tuple[tuple[str, torch.Tensor], ...]:
        """(field name, value) pairs, to write the state back."""
        return tuple((f"{key}_{name}", getattr(self, name)) for name in ("s2", "m", "mu", "v", "cal"))


@dataclass
class Surprise:
    """One reading scored by a likelihood (nothing learnt yet)."""

    m: torch.Tensor  # [B] the new short mean
    q: torch.Tensor  # [C, B] r^2 / s2 per channel (squared standardised residual)
    log10_p_raw: torch.Tensor  # [B] Gaussian tail, log10, before calibration
    log10_p: torch.Tensor  # [B] calibrated, log10, <= 0 (0 until MIN_READINGS)


def surprise(lik: Likelihood, r: torch.Tensor, n: torch.Tensor, active: torch.Tensor,
             short_alpha: float = SHORT_ALPHA) -> Surprise:
    """Score residuals ``r`` [C, B] (normalised units); ``n`` [B] readings the likelihood learnt from, ``active``
    [B] rows whose short mean moves (the others keep theirs: a device still settling); ``short_alpha`` the
    short mean's weight per reading.

    >>> lik = Likelihood(torch.ones(1, 2), torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    >>> out = surprise(lik, torch.tensor([[0.0, 30.0]]), torch.tensor([50, 50]), torch.tensor([True, True]))
    >>> [round(v, 2) for v in out.log10_p.tolist()]  # m = 0.1 log(901) = 0.68 sd above its mean
    [-0.3, -0.61]
    """
    q = r * r / lik.s2
    a = torch.log1p(q).amax(dim=0)
    m = torch.where(n == 0, a, lik.m + short_alpha * (a - lik.m))
    m = torch.where(active, m, lik.m)
    z = (m - lik.mu) / torch.sqrt(lik.v + 1e-12)
    raw = torch.special.log_ndtr(-z) / _LN10
    log10_p = torch.clamp(raw + torch.log10(torch.clamp(lik.cal, min=CAL_FLOOR)), max=0.0)
    return Surprise(m, q, raw, torch.where(n >= MIN_READINGS, log10_p, 0.0))


def learn(lik: Likelihood, r: torch.Tensor, out: Surprise, n: torch.Tensor, mask: torch.Tensor) -> Likelihood:
    """The state after reading ``r`` [C, B]: every statistic learns where ``mask`` [B] allows it; the short mean
    moves regardless (it measures the present, alert or not).

    >>> lik = Likelihood(torch.ones(1, 1), torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1))
    >>> r = torch.tensor([[2.0]])
    >>> out = surprise(lik, r, torch.tensor([0]), torch.tensor([True]))
    >>> new = learn(lik, r, out, torch.tensor([0]), torch.tensor([True]))
    >>> new.s2.item(), round(new.m.item(), 4), round(new.mu.item(), 4), new.v.item()  # the first reading sets all
    (4.0, 1.6094, 1.6094, 1.0)
    """
    al = torch.clamp(1.0 / (n.to(r.dtype) + 1.0), min=LONG_ALPHA)  # exact mean first, then exponential
    r2 = torch.minimum(r * r, S2_CLIP * lik.s2)
    s2 = torch.where(mask, torch.clamp(lik.s2 + al * (r2 - lik.s2), min=S2_FLOOR), lik.s2)
    d = out.m - lik.mu
    mu = torch.where(mask, lik.mu + al * d, lik.mu)
    v = torch.where(mask, torch.where(n == 0, 1.0, (1.0 - al) * (lik.v + al * d * d)), lik.v)
    hit = (out.log10_p_raw < LOG10_CAL_P).to(r.dtype) / CAL_P
    ac = torch.clamp(1.0 / (n.to(r.dtype) + 1.0), min=CAL_ALPHA)
    cal = torch.where(mask & (n >= MIN_READINGS), lik.cal + ac * (hit - lik.cal), lik.cal)
    return Likelihood(s2, out.m, mu, v, cal)


@dataclass
class AlertState:
    """Per-row alert fields of one wave (views gathered from the state store)."""

    open: torch.Tensor  # bool [B]
    age: torch.Tensor  # int32 [B], readings since the open alert opened
    cooldown: torch.Tensor  # int32 [B], readings during which no alert opens
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
    """Runs the alert state machine on combined tail probabilities (``log10 p``).

    >>> scorer = AnomalyScorer(OperatorSettings(alert_probability=1e-3, exit_after=2, cooldown_events=3))
    >>> scorer.threshold
    3.0
    >>> state = AlertState(torch.tensor([False]), *(torch.zeros(1, dtype=torch.int32) for _ in range(3)))
    >>> events = []
    >>> for lp in [-1.0, -5.0, -4.0, -0.5, -0.2, -6.0, -0.1, -0.1, -6.0]:
    ...     step = scorer.step(state, torch.tensor([lp]), torch.tensor([False]), warm=torch.tensor([True]))
    ...     state = step.state
    ...     events.append((int(step.opened), int(step.in_alert)))
    >>> events  # one alert for the burst; closed after 2 calm readings; 3 readings of cooldown, then a new one
    [(0, 0), (1, 1), (0, 1), (0, 1), (0, 0), (0, 0), (0, 0), (0, 0), (1, 1)]
    """

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        #: The score at and above which an alert opens: -log10(alert_probability), decades of tail probability.
        self.threshold = -math.log10(settings.alert_probability)
        self._log10_calm = math.log10(CALM_RATIO * settings.alert_probability)

    def step(self, state: AlertState, log10_p: torch.Tensor, condition: torch.Tensor,
             warm: torch.Tensor) -> AlertStep:
        """Advance the state machine by one reading per row; NaN (first readings) never triggers nor calms.

        ``log10_p`` [B]: the combined tail probability; ``condition`` [B] bool: a rule that triggers whatever
        the probability (a stuck channel) and keeps an open alert from calming down; ``warm`` [B] bool: the
        device may open alerts (past warm-up and commissioning).
        """
        s = self.settings
        trigger = (log10_p < -self.threshold) | condition
        opened = trigger & ~state.open & warm & (state.cooldown <= 0)
        is_open = state.open | opened
        calm_now = (log10_p > self._log10_calm) & ~condition
        zero = torch.zeros_like(state.calm)
        calm = torch.where(is_open & calm_now & ~opened, state.calm + 1, zero)
        age = torch.where(is_open & ~opened, state.age + 1, zero)
        closing = is_open & ~opened & ((calm >= s.exit_after) | (age >= s.max_alert_events))
        still_open = is_open & ~closing
        cooldown = torch.where(closing, s.cooldown_events, torch.clamp(state.cooldown - 1, min=0))
        new_state = AlertState(still_open, torch.where(closing, zero, age), cooldown.to(state.cooldown.dtype),
                               torch.where(closing, zero, calm))
        return AlertStep(new_state, opened, still_open, learn=~is_open)

    @staticmethod
    def severity(score: float, threshold: float) -> str:
        """``critical`` when the score is at least twice the threshold (p below alert_probability squared),
        else ``warning``."""
        return "critical" if score >= 2.0 * threshold else "warning"
