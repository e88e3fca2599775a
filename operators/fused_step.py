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

import math

import torch

from liquidstream.operators.asof import forecast_reading
from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.layout import FLAG_CLOSED, FLAG_IN_ALERT, FLAG_OPENED, FLAG_REASON, OutputRows
from liquidstream.operators.normalization import CLIP_Z, scale, update_stats
from liquidstream.operators.result import AlertReason as R
from liquidstream.operators.scoring import AlertState, AnomalyScorer, Likelihood, Surprise, learn, surprise
from liquidstream.operators.state.store import DeviceStateStore

#: Smoothing of the per-device gap estimate (the forecast horizon), per reading.
GAP_ALPHA = 0.1
#: Bounds of the per-channel calibration of the model's spread (ratio of observed to predicted residual
#: variance): it scales the reported forecast_std.
CALIB_CLAMP = 400.0
CALIB_MIN = 0.01
#: Horizon assumed for a device that has sent a single reading, seconds.
DEFAULT_GAP_S = 1.0
#: Waves of fewer devices work on strided views of the gathered rows instead of transposed copies.
TRANSPOSE_MIN_ROWS = 1024
#: anomaly_score = L / (L + SCORE_HALF), L = -log10 p: 0.5 at p = 1e-10 (monotone, never saturates).
SCORE_HALF = 10.0


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
    values, ``ts`` int64 event time ms (unused: the alert machine counts readings), ``dt`` float32 seconds since
    the previous applied reading, ``cnt`` readings applied before, ``reset`` bool [B] (None: no row resets);
    writes ``o_f`` float32 [3C + 6, B] and ``o_b`` int8 [4, B], rows as
    :class:`~liquidstream.operators.layout.OutputRows` and the ``FLAG_*`` rows name them."""
    del ts  # event time drives the wave plan (order, gaps), not the step
    s, c = settings, model.n_channels
    w = WaveState(store, idx)
    f = w.field
    first = cnt == 0
    x_last, mean, var, calib = f("x_last"), f("mean"), f("var"), f("calib")
    # 1. forecast this reading from the state before it, at the real gap (delta and absolute forecasts)
    mu, sd, ab, sc = forecast_reading(model, w.h, x_last, mean, var, dt)  # shared with forecast_at (asof.py)
    x_z = (x - mean) / sc  # unclipped: the likelihoods must see how far out a reading is
    rows = OutputRows(c)
    comm = f("commissioning")
    n_comm = torch.where(comm >= 0, comm, s.commissioning_events)  # this device's commissioning, readings
    in_comm = cnt < n_comm  # normal by assumption: everything learns from it, nothing alerts on it
    settle_at = max(s.warmup_events // 2, 2)
    settled = cnt >= settle_at  # before it the normalisation (hence every residual) is still unreliable
    warm = (cnt >= s.warmup_events) & ~in_comm
    # 2. anomaly likelihoods of the residuals (normalised units), combined with a Bonferroni correction
    lik_n = f("lik_n")
    residuals: list[tuple[str, torch.Tensor]] = []
    if s.model_triggers:
        residuals.append(("d", x_z - mu))
        if ab is not None:
            residuals.append(("a", x_z - ab))
    if s.level_rule:
        residuals.append(("l", x_z))  # against the device's normal level: its normalised reading itself
    scored: list[tuple[str, torch.Tensor, Likelihood, Surprise]] = []
    for key, r in residuals:
        lik = Likelihood.of(f, key)
        scored.append((key, r, lik, surprise(lik, r, lik_n, settled)))
    _expected(x, sc, scored, o_f[rows.expected], o_f[rows.expected_std])
    best = scored[0][3].log10_p
    for _, _, _, out in scored[1:]:
        best = torch.minimum(best, out.log10_p)
    log10_p = torch.clamp(best + math.log10(len(scored)), max=0.0) if len(scored) > 1 else best
    log10_p = log10_p.masked_fill(first, float("nan"))  # no forecast before a first reading
    # Saturating: only ">= stuck_after" matters, and int16 must not wrap on a sensor stuck for hours.
    stuck_run = torch.where((x == x_last) & ~first, f("stuck").to(torch.int32) + 1, 0).clamp_(
        max=min(s.stuck_after, 32767)).to(torch.int16)
    # A channel that repeats for half the stuck length during commissioning repeats legitimately.
    repeats = f("repeats") | (in_comm & (stuck_run >= max(s.stuck_after // 2, 2)))
    stuck_ch = (stuck_run >= s.stuck_after) & ~repeats
    stuck = stuck_ch.any(dim=0) & ~in_comm
    condition = stuck if s.stuck_rule else torch.zeros_like(stuck)
    if s.stuck_rule:  # a stuck reading is at least as surprising as the alert threshold says
        log10_p = torch.where(condition, log10_p.nan_to_num(0.0).clamp(max=-scorer.threshold), log10_p)
    # 3. alert state machine
    alert = scorer.step(AlertState(f("alert_open"), f("alert_age"), f("cooldown"), f("calm")), log10_p, condition,
                        warm)
    learn_ok = alert.learn | in_comm  # statistics learn outside alerts, and from all of commissioning
    # 4. statistics learn (a first reading always initialises the normalisation)
    lik_learn = learn_ok & settled
    for key, r, lik, out in scored:
        for name, value in learn(lik, r, out, lik_n, lik_learn).items(key):
            w.set(name, value)
    w.set("lik_n", lik_n + lik_learn.to(lik_n.dtype))
    new_mean, new_var = update_stats(mean, var, cnt, x, s.stats_alpha, channels_first=True)
    # After a commissioning the spread freezes (a slow or long anomaly is measured against commissioning's);
    # the level keeps following slow drift.
    var_learn = learn_ok & ((n_comm <= 0) | in_comm)
    mean = torch.where(learn_ok, new_mean, mean)
    var = torch.where(var_learn, new_var, var)
    calib_ok = learn_ok & settled
    n_settled = (cnt - settle_at + 1).to(calib.dtype).clamp(min=1.0)
    raw_z2 = torch.clamp(((x_z - mu) / sd) ** 2, max=CALIB_CLAMP)  # squared residual in the model's own spread
    w_cal = torch.clamp(1.0 / n_settled, min=s.stats_alpha)
    calib = torch.clamp(torch.where(calib_ok, calib + w_cal * (raw_z2 - calib), calib), min=CALIB_MIN)
    # 5. fold the reading into the hidden state (written over the gathered rows: the old state is not read again)
    h = w.h if reset is None else w.h.masked_fill(reset.unsqueeze(1), 0.0)
    sc = scale(mean, var)
    x_s = (x - mean) / sc  # this reading, normalised with the statistics it just taught
    x_n = torch.clamp(x_s, -CLIP_Z, CLIP_Z)
    model.advance_columns(h, x_n, dt, out=w.h)
    gap = f("gap_ema")
    gap_dt = torch.clamp(dt, max=s.max_gap_s)
    gap = torch.where(first, DEFAULT_GAP_S,
                      torch.where(dt <= 0, gap, torch.where(cnt == 1, gap_dt, gap + GAP_ALPHA * (gap_dt - gap))))
    # 6. forecast the next reading at the usual gap, back in raw units
    mu2, sd2 = model.forecast_columns(w.h, x_n, gap)
    mu2 = mu2 + (x_s - x_n)  # the unclipped skip, as above
    torch.addcmul(mean, mu2, sc, out=o_f[rows.forecast])
    torch.mul(sd2 * sc, torch.sqrt(calib), out=o_f[rows.std])
    q = scored[0][3].q
    for _, _, _, out in scored[1:]:
        q = torch.maximum(q, out.q)
    o_f[rows.z] = torch.sqrt(q).masked_fill_(stuck_ch, float("inf"))
    score = log10_p.neg().add_(0.0)  # L, decades of surprise (NaN on first readings); + 0.0 turns -0.0 into 0.0
    o_f[rows.horizon], o_f[rows.score], o_f[rows.threshold] = gap, score, scorer.threshold
    torch.div(score, score + SCORE_HALF, out=o_f[rows.anomaly_score])
    closed = alert.closed
    o_b[FLAG_IN_ALERT], o_b[FLAG_OPENED], o_b[FLAG_CLOSED] = alert.in_alert, alert.opened, closed
    reason = torch.full_like(stuck, R.ANOMALY_LIKELIHOOD.code, dtype=torch.int8)
    if s.level_rule:
        level = scored[-1][3].log10_p
        reason = torch.where(level <= best, R.LEVEL_DEVIATION.code, reason)  # the level rule was the surprise
    if s.stuck_rule:
        reason = torch.where(condition, R.STUCK_SENSOR.code, reason)
    # The alert's lifecycle: why it opened, its peak score and its length, reported on the reading that closes it.
    live = alert.in_alert | closed  # an alert is open at this reading (it may close on it)
    alert_reason = torch.where(alert.opened, reason.to(torch.int16), f("alert_reason"))
    o_b[FLAG_REASON] = torch.where(alert.opened | ~live, reason, alert_reason.to(torch.int8))
    s_now = score.nan_to_num(0.0)
    peak = torch.where(alert.opened, s_now, torch.where(live, torch.maximum(f("alert_peak"), s_now), 0.0))
    o_f[rows.alert_peak] = peak
    o_f[rows.alert_readings] = torch.where(alert.opened, 1, torch.where(live, f("alert_age") + 2, 0))
    # 7. new values into the wave's columns, then one transposed copy and one scatter per block
    for name, value in (("x_last", x), ("mean", mean), ("var", var), ("calib", calib), ("gap_ema", gap),
                        ("stuck", stuck_run), ("repeats", repeats), ("alert_open", alert.state.open),
                        ("alert_age", alert.state.age), ("cooldown", alert.state.cooldown), ("calm", alert.state.calm),
                        ("alert_peak", torch.where(alert.in_alert, peak, 0.0)),
                        ("alert_reason", torch.where(alert.in_alert, alert_reason, 0))):
        w.set(name, value)
    w.scatter()


def _expected(x: torch.Tensor, sc: torch.Tensor, scored: list[tuple[str, torch.Tensor, Likelihood, Surprise]],
              expected: torch.Tensor, spread: torch.Tensor) -> None:
    """Per channel, the residual that sets its z (the largest ``q`` over the likelihoods): the value it measured
    the reading against and its spread, raw units ``[C, B]`` (alert explanations; before anything learns)."""
    q = torch.stack([out.q for _, _, _, out in scored])  # [K, C, B]
    best = q.argmax(dim=0, keepdim=True)  # first maximum on ties, as the compiled step
    r = torch.stack([res for _, res, _, _ in scored]).gather(0, best)[0]
    s2 = torch.stack([lik.s2 for _, _, lik, _ in scored]).gather(0, best)[0]
    torch.sub(x, r * sc, out=expected)
    torch.mul(torch.sqrt(s2), sc, out=spread)
