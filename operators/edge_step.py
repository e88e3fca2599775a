"""The operator's forecasting step for one reading per device, with all of its state explicit: what an edge
runtime loops after ``liquidstream export`` (ONNX or TorchScript).

:class:`EdgeStep` is :func:`~liquidstream.operators.fused_step.run_wave`'s forecasting path, rows first: the gap
policy of :func:`~liquidstream.operators.waves.plan_waves` (a first reading steps by 0 s; ``clamp`` and
``reset`` on a gap over ``max_gap_s``), the forecast of this reading from the state before it
(:func:`~liquidstream.operators.asof.forecast_reading`: what a runtime scores the reading against), the running
normalisation and spread calibration, the cell step by the real gap in seconds, the usual gap, and the forecast of
the next reading at it.  The anomaly likelihoods and the alert state machine stay with the runtime: it says, per
reading, whether the statistics may learn from it (``learn``: the operator's rule is "no alert is live at this
reading, or the device is commissioning"); ``commissioning_events`` is the setting's, per-device lengths are not
exported.

Inputs (``B`` devices, ``C`` channels, ``H`` hidden units; float32 unless said): ``x`` [B, C] the reading, raw
units; ``dt_s`` [B] seconds since the device's previous reading (ignored on a first reading; a late reading: pass
0); ``learn`` bool [B]; then the state :data:`STATE`: ``h`` [B, H], ``x_last``, ``mean``, ``var``, ``calib`` [B, C],
``gap_s`` [B] (the usual gap, seconds), ``count`` int64 [B] (readings applied before).  Outputs: ``expected``,
``expected_std`` [B, C] (this reading's forecast and spread, raw units), ``forecast``, ``forecast_std`` [B, C] (the
next reading's at ``horizon_s`` [B] seconds, as a prediction record's), then the new state in :data:`STATE` order.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from liquidstream.operators.asof import forecast_reading
from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.fused_step import CALIB_CLAMP, CALIB_MIN, DEFAULT_GAP_S, GAP_ALPHA
from liquidstream.operators.normalization import CLIP_Z, scale, update_stats

__all__ = ["INPUTS", "OUTPUTS", "STATE", "EdgeStep"]

#: The per-device state, in the order it goes in (after ``x``, ``dt_s``, ``learn``) and comes out.
STATE = ("h", "x_last", "mean", "var", "calib", "gap_s", "count")
INPUTS = ("x", "dt_s", "learn", *STATE)
OUTPUTS = ("expected", "expected_std", "forecast", "forecast_std", "horizon_s", *(f"{n}_out" for n in STATE))
StepOut = tuple[torch.Tensor, ...]


class EdgeStep(nn.Module):
    """One reading of each of B devices; pure function of its inputs (the model's weights and the operator
    settings are constants).

    >>> step = EdgeStep(Forecaster(n_channels=2, hidden_size=4), OperatorSettings())
    >>> state = step.initial_state(1)
    >>> out = step(torch.tensor([[1.0, 2.0]]), torch.tensor([0.0]), torch.tensor([True]), *state)
    >>> [tuple(t.shape) for t in out[:5]], out[-1].tolist()  # ... and the state after the reading
    ([(1, 2), (1, 2), (1, 2), (1, 2), (1,)], [1])
    """

    def __init__(self, model: Forecaster, settings: OperatorSettings) -> None:
        super().__init__()
        # A frozen copy: with autograd nominally on (as exporters trace) derived weights are rebuilt from the
        # parameters inside the graph instead of read from a serving cache keyed by storage addresses.
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.alpha, self.max_gap_s = settings.stats_alpha, settings.max_gap_s
        self.policy = settings.gap_policy
        self.settle_at = max(settings.warmup_events // 2, 2)  # as run_wave: residuals reliable from here on
        self.commissioning = settings.commissioning_events

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """The state of ``batch`` devices never seen (the store's neutral values), in :data:`STATE` order."""
        c, h = self.model.n_channels, self.model.hidden_size
        return (torch.zeros(batch, h), torch.zeros(batch, c), torch.zeros(batch, c), torch.ones(batch, c),
                torch.ones(batch, c), torch.zeros(batch), torch.zeros(batch, dtype=torch.int64))

    def forward(self, x: torch.Tensor, dt_s: torch.Tensor, learn: torch.Tensor, h: torch.Tensor,
                x_last: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, calib: torch.Tensor,
                gap_s: torch.Tensor, count: torch.Tensor) -> StepOut:
        # Channels first inside, as run_wave computes (the same float32 sums); rows outside.
        x, x_last, mean, var, calib = x.t(), x_last.t(), mean.t(), var.t(), calib.t()
        first = count == 0
        # The planner's gap policy (seconds): a first reading has no gap; a long one is flagged, clamped or reset.
        dt = torch.where(first, torch.zeros_like(dt_s), torch.clamp(dt_s, min=0.0))
        long_gap = dt > self.max_gap_s
        if self.policy == "clamp":
            dt = torch.clamp(dt, max=self.max_gap_s)
        mu, sd, _, sc = forecast_reading(self.model, h, x_last, mean, var, dt)
        expected, expected_std = mean + mu * sc, sd * sc * torch.sqrt(calib)
        x_z = (x - mean) / sc
        settled = count >= self.settle_at
        # Commissioning readings always teach; after a commissioning the spread freezes (as run_wave).
        in_comm = count < self.commissioning
        learn_ok = learn | in_comm
        new_mean, new_var = update_stats(mean, var, count, x, self.alpha, channels_first=True)
        var_learn = learn_ok & in_comm if self.commissioning > 0 else learn_ok
        mean = torch.where(learn_ok, new_mean, mean)
        var = torch.where(var_learn, new_var, var)
        n_settled = (count - self.settle_at + 1).to(calib.dtype).clamp(min=1.0)
        raw_z2 = torch.clamp(((x_z - mu) / sd) ** 2, max=CALIB_CLAMP)
        w_cal = torch.clamp(1.0 / n_settled, min=self.alpha)
        calib = torch.clamp(torch.where(learn_ok & settled, calib + w_cal * (raw_z2 - calib), calib), min=CALIB_MIN)
        if self.policy == "reset":
            h = torch.where(long_gap.unsqueeze(1), torch.zeros_like(h), h)
        sc = scale(mean, var)
        x_s = (x - mean) / sc
        x_n = torch.clamp(x_s, -CLIP_Z, CLIP_Z)
        h = self.model.advance(h, x_n.t(), dt)
        gap_dt = torch.clamp(dt, max=self.max_gap_s)
        gap = torch.where(first, torch.full_like(gap_s, DEFAULT_GAP_S), torch.where(
            dt <= 0, gap_s, torch.where(count == 1, gap_dt, gap_s + GAP_ALPHA * (gap_dt - gap_s))))
        mu2, sd2 = self.model.forecast_columns(h, x_n, gap)
        mu2 = mu2 + (x_s - x_n)
        forecast, std = mean + mu2 * sc, sd2 * sc * torch.sqrt(calib)
        return (expected.t(), expected_std.t(), forecast.t(), std.t(), gap, h, x.t(), mean.t(), var.t(), calib.t(),
                gap, count + 1)
