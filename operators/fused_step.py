"""One wave of the step operator, computed with the per-device statistics laid out channels first.

The state store keeps one row per device (a gather or scatter is one contiguous copy per device), but
elementwise work on ``[B, C]`` column views of those rows is slow on a CPU: the inner dimension is the 8
channels, strided by the row width, so masks, ``where`` and per-row reductions run short scalar loops
(measured 4-15x slower per op than on a contiguous ``[C, B]`` tensor at B = 4,000).  So every field but
the hidden state is handled channels first (``[C, B]``, scalars ``[B]``): in a wave of at least
``TRANSPOSE_MIN_ROWS`` devices as one transposed copy per gathered block (:class:`WaveState`), copied back
before the scatter; in a smaller wave, where per-op overhead dominates and the copies would not pay, as
strided views of the gathered rows.  The hidden state stays in rows: it only feeds matmuls, which read either
layout without a copy (:meth:`~liquidstream.operators.forecaster.Forecaster.forecast_columns`, ``advance_columns``).

The maths is :class:`~liquidstream.operators.operator.LiquidOperator`'s (see its module docstring for the steps);
only the layout and the order of float32 sums inside the matmuls differ.
"""

from __future__ import annotations

import torch

from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.layout import FLAG_IN_ALERT, FLAG_OPENED, FLAG_REASON, OutputRows
from liquidstream.operators.normalization import CLIP_Z, scale, update_stats
from liquidstream.operators.result import AlertReason as R
from liquidstream.operators.scoring import AlertState, AnomalyScorer
from liquidstream.operators.smoothed_level import learn_spread, smoothed_level
from liquidstream.operators.state.store import DeviceStateStore

#: Smoothing of the per-device gap estimate (the forecast horizon), per reading.
GAP_ALPHA = 0.1
#: Squared residuals above this are clamped in the sustained-deviation statistic.
Z2_CLAMP = 25.0
#: Bounds of the per-channel calibration (ratio of observed to predicted residual variance).
CALIB_CLAMP = 400.0
CALIB_MIN = 0.01
#: Horizon assumed for a device that has sent a single reading, seconds.
DEFAULT_GAP_S = 1.0
#: Waves of fewer devices work on strided views of the gathered rows instead of transposed copies.
TRANSPOSE_MIN_ROWS = 1024


class WaveState:
    """The store rows of one wave: ``h`` as a row view, every other field channels first.

    One transposed copy per dtype block on the way in (:meth:`field` returns views of it, or views of the
    rows themselves in a small wave) and one on the way out (:meth:`scatter`); fields are written with
    :meth:`set`.  Fields a wave does not touch (added by an option, say) travel through unchanged.
    """

    def __init__(self, store: DeviceStateStore, idx: torch.Tensor) -> None:
        self.store, self.idx = store, idx
        self.rows = store.gather(idx)
        h_start, h_stop = store.columns["h"]
        self._h_dtype = store.tensors["h"].dtype
        self._skip = h_stop if h_start == 0 else 0  # leading hidden-state columns, left out of the transpose
        # Small waves skip the copies: per-op overhead, not the strided inner loops, dominates there.
        copy = idx.shape[0] >= TRANSPOSE_MIN_ROWS
        self.cols = {dtype: self._rest(dtype).t().contiguous() if copy else self._rest(dtype).t()
                     for dtype in self.rows}
        self.h = self.rows[self._h_dtype][:, h_start:h_stop]  # [B, H] row view, overwritten by the cell step
        self._views: dict[str, torch.Tensor] = {}

    def _rest(self, dtype: torch.dtype) -> torch.Tensor:
        block = self.rows[dtype]
        return block[:, self._skip:] if dtype == self._h_dtype else block

    def field(self, name: str) -> torch.Tensor:
        """Field ``name`` channels first: [C, B] (or [H, B]) for vector fields, [B] for scalars."""
        view = self._views.get(name)
        if view is None:
            t = self.store.tensors[name]
            start, stop = self.store.columns[name]
            skip = self._skip if t.dtype == self._h_dtype else 0
            col = self.cols[t.dtype][start - skip:stop - skip]
            view = self._views[name] = col if t.dim() == 2 else col[0]
        return view

    def set(self, name: str, value: torch.Tensor) -> None:
        self.field(name).copy_(value)

    def scatter(self) -> None:
        """Write every field back into the gathered rows, then the rows into the store."""
        for dtype, cols in self.cols.items():
            rest = self._rest(dtype)
            if cols.data_ptr() != rest.data_ptr():  # a view (small wave, one-column block): written in place
                rest.copy_(cols.t())
        self.store.scatter(self.idx, self.rows)


def run_wave(settings: OperatorSettings, scorer: AnomalyScorer, model: Forecaster, store: DeviceStateStore,
             idx: torch.Tensor, x: torch.Tensor, ts: torch.Tensor, dt: torch.Tensor, cnt: torch.Tensor,
             reset: torch.Tensor | None, o_f: torch.Tensor, o_b: torch.Tensor) -> None:
    """One reading for each of B distinct devices, channels first: ``idx`` store rows, ``x`` float32 [C, B] raw
    values, ``ts`` int64 event time ms, ``dt`` float32 seconds since the previous applied reading, ``cnt``
    readings applied before, ``reset`` bool [B] (None: no row resets); writes ``o_f`` float32
    [3C + 3, B] (forecast | std | z | horizon, score, threshold) and ``o_b`` int8 [3, B] (in_alert | opened |
    reason)."""
    s, c = settings, model.n_channels
    w = WaveState(store, idx)
    f = w.field
    first = cnt == 0
    x_last, mean, var, calib = f("x_last"), f("mean"), f("var"), f("calib")
    # 1. forecast this reading from the state before it, at the real gap, and score it
    sc = scale(mean, var)
    mu, sd = model.forecast_columns(w.h, torch.clamp((x_last - mean) / sc, -CLIP_Z, CLIP_Z), dt)
    x_z = (x - mean) / sc  # unclipped: the score must see how far out a reading is
    # Per-device, per-channel calibration of the model's spread (see LiquidOperator).
    score, z = scorer.score(x_z, mu, sd * torch.sqrt(calib), channel_dim=0)
    score = score.masked_fill(first, float("nan"))
    score_mean, score_var = f("score_mean"), f("score_var")
    thr = scorer.threshold(score_mean, score_var)
    # Saturating: only ">= stuck_after" matters, and int16 must not wrap on a sensor stuck for hours.
    stuck_run = torch.where((x == x_last) & ~first, f("stuck").to(torch.int32) + 1, 0).clamp_(
        max=min(s.stuck_after, 32767)).to(torch.int16)
    stuck_ch = stuck_run >= s.stuck_after
    stuck = stuck_ch.any(dim=0)
    settle_at = max(s.warmup_events // 2, 2)
    settled = cnt >= settle_at
    z2 = torch.clamp((z * z).mean(dim=0), max=Z2_CLAMP)
    fast = f("z2_fast")
    fast = torch.where(settled, fast + s.sustained_alpha * (z2 - fast), fast)
    warm = cnt >= s.warmup_events
    sustained = warm & (fast > s.sustained_ratio)
    lvl = None if not s.level_smoothing else smoothed_level(x, f("level_ema"), mean, f("level_var"), first,
                                                            s.level_smoothing)
    level_z = x_z if lvl is None else lvl.z  # the level rule reads the smoothed reading when that is on
    level = level_z.abs().amax(dim=0)  # distance from the device's normal level, in its own std units
    level_high = warm & (level > s.level_sigma)
    # 2. alert state machine
    alert = scorer.step(
        AlertState(f("alert_open"), f("alert_since_ms"), f("cooldown_ms"), f("calm")),
        score, thr, stuck | sustained | level_high, ts, warm=warm, hold=level > s.hold_sigma)
    learn = alert.learn
    if s.learn_calm_channels:
        learn = learn | (level_z.abs() < s.hold_sigma)
    # 3. statistics learn only outside alerts (a first reading always initialises them)
    new_mean, new_var = update_stats(mean, var, cnt, x, s.stats_alpha, channels_first=True)
    if s.reference_events:
        in_ref = cnt < s.reference_events
        learn = learn | in_ref  # the reference readings are assumed normal: they all teach the statistics
        new_var = torch.where(in_ref, new_var, var)
        if s.reference_level:
            new_mean = torch.where(in_ref, new_mean, mean)
    mean = torch.where(learn, new_mean, mean)
    var = torch.where(learn, new_var, var)
    if lvl is not None:  # the smoothed distance's spread learns (and freezes) like var
        w.set("level_var", learn_spread(f("level_var"), lvl.dev, cnt, s.stats_alpha,
                                        learn & in_ref if s.reference_events else learn))
        w.set("level_ema", lvl.ema)
    if s.rebase_on_close:  # an alert that just closed: the device's current state becomes its level
        mean = torch.where(alert.closed, x if lvl is None else lvl.ema, mean)
    score_ok = alert.learn & settled
    n_settled = (cnt - settle_at + 1).to(calib.dtype).clamp(min=1.0)
    sm, sv = update_stats(score_mean, score_var, n_settled - 1, torch.minimum(score, thr).nan_to_num(0.0),
                          s.stats_alpha, channels_first=True)
    score_mean = torch.where(score_ok, sm, score_mean)
    score_var = torch.where(score_ok, sv, score_var)
    raw_z2 = torch.clamp(z * z * calib, max=CALIB_CLAMP)
    w_cal = torch.clamp(1.0 / n_settled, min=s.stats_alpha)
    calib = torch.clamp(torch.where(score_ok, calib + w_cal * (raw_z2 - calib), calib), min=CALIB_MIN)
    # 4. fold the reading into the hidden state (written over the gathered rows: the old state is not read again)
    h = w.h if reset is None else w.h.masked_fill(reset.unsqueeze(1), 0.0)
    sc = scale(mean, var)
    x_n = torch.clamp((x - mean) / sc, -CLIP_Z, CLIP_Z)
    model.advance_columns(h, x_n, dt, out=w.h)
    gap = f("gap_ema")
    gap_dt = torch.clamp(dt, max=s.max_gap_s)
    gap = torch.where(first, DEFAULT_GAP_S,
                      torch.where(dt <= 0, gap, torch.where(cnt == 1, gap_dt, gap + GAP_ALPHA * (gap_dt - gap))))
    # 5. forecast the next reading at the usual gap, back in raw units
    mu2, sd2 = model.forecast_columns(w.h, x_n, gap)
    rows = OutputRows(c)
    torch.addcmul(mean, mu2, sc, out=o_f[rows.forecast])
    torch.mul(sd2 * sc, torch.sqrt(calib), out=o_f[rows.std])
    o_f[rows.z] = z.masked_fill_(stuck_ch, float("inf"))  # z is not read again
    o_f[rows.horizon], o_f[rows.score], o_f[rows.threshold] = gap, score, thr
    o_b[FLAG_IN_ALERT], o_b[FLAG_OPENED] = alert.in_alert, alert.opened
    o_b[FLAG_REASON] = torch.where(stuck, R.STUCK_SENSOR.code, torch.where(
        score > thr, R.FORECAST_DEVIATION.code, torch.where(sustained, R.SUSTAINED_DEVIATION.code,
                                                            R.LEVEL_DEVIATION.code)))
    # 6. new values into the wave's columns, then one transposed copy and one scatter per block
    for name, value in (("x_last", x), ("mean", mean), ("var", var), ("calib", calib), ("score_mean", score_mean),
                        ("score_var", score_var), ("gap_ema", gap), ("z2_fast", fast), ("stuck", stuck_run),
                        ("alert_open", alert.state.open), ("alert_since_ms", alert.state.since_ms),
                        ("cooldown_ms", alert.state.cooldown_ms), ("calm", alert.state.calm)):
        w.set(name, value)
    w.scatter()
