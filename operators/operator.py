"""The batched step operator: columnar readings in, forecasts, scores and alerts out.

``process`` takes a whole batch (any interleaving of devices), plans it into waves on the host
(:mod:`operators.waves`), then runs one cell call per wave over all devices in that wave, gathering and
scattering their rows in the :class:`~operators.state_store.DeviceStateStore`.  Per wave: forecast the
reading from the state *before* it (at the real gap), score it, run the alert state machine, update the
running statistics (unless inside an alert), fold the reading into the hidden state, and forecast the next
reading at the device's usual gap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from operators.config import OperatorSettings
from operators.errors import InputError
from operators.forecaster import Forecaster
from operators.normalization import CLIP_Z, scale, update_stats
from operators.result import Alert, StepResult
from operators.scoring import AlertState, AnomalyScorer
from operators.state_store import DeviceStateStore
from operators.waves import plan_waves

#: Smoothing of the per-device gap estimate (the forecast horizon), per reading.
_GAP_ALPHA = 0.1
#: Squared residuals above this are clamped in the sustained-deviation statistic.
_Z2_CLAMP = 25.0
#: Bounds of the per-channel calibration (ratio of observed to predicted residual variance).
_CALIB_CLAMP = 400.0
_CALIB_MIN = 0.01
#: Alert reasons by code, as recorded per event in the wave loop.
_REASONS = ("forecast_deviation", "stuck_sensor", "sustained_deviation", "level_deviation")
#: Horizon assumed for a device that has sent a single reading, seconds.
_DEFAULT_GAP_S = 1.0
#: Output block layout per applied event: ``_OUT_F`` per-channel float32 columns (forecast, std, z) and
#: ``_OUT_S`` scalars (horizon seconds, score, threshold).
_OUT_F, _OUT_S = 3, 3


class LiquidOperator:
    """Per-device continuous-time forecasting and anomaly scoring over columnar batches.

    >>> model = Forecaster(n_channels=2, hidden_size=8, cell="cfc")
    >>> op = LiquidOperator(model, OperatorSettings())
    >>> res = op.process(["a", "b", "a"], np.array([1000, 1000, 2500]),
    ...                  np.array([[1, 2], [3, 4], [1.5, 2]], dtype=np.float32))
    >>> [s for s in res.status.tolist()], bool(np.isnan(res.score[0])), bool(np.isfinite(res.score[2]))
    ([1, 1, 0], True, True)
    >>> len(op.store)
    2
    """

    def __init__(self, model: Forecaster, settings: OperatorSettings, *, device: str | torch.device = "cpu",
                 initial_capacity: int = 1024, model_version: str = "untrained") -> None:
        self.settings = settings
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model_version = model_version
        self.n_channels = model.n_channels
        self.scorer = AnomalyScorer(settings)
        self.store = DeviceStateStore(model.hidden_size, model.n_channels, initial_capacity=initial_capacity,
                                      device=self.device)

    def swap_model(self, model: Forecaster, version: str) -> None:
        """Serve a new model from the next call on (call between batches); device state is kept."""
        if model.hidden_size != self.model.hidden_size or model.n_channels != self.n_channels:
            msg = "a swapped-in model must keep hidden_size and n_channels"
            raise InputError(msg)
        self.model = model.to(self.device).eval()
        self.model_version = version

    def evict_idle(self, now_ms: int) -> list[str]:
        return self.store.evict_idle(now_ms, self.settings.state_ttl_s)

    def _validate(self, device_ids: Sequence[str], ts_ms: np.ndarray, values: np.ndarray) -> None:
        n = len(device_ids)
        if ts_ms.shape != (n,) or values.shape != (n, self.n_channels):
            msg = (f"expected ts_ms [{n}] and values [{n}, {self.n_channels}], "
                   f"got {ts_ms.shape} and {values.shape}")
            raise InputError(msg)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            msg = f"non-finite reading for device {device_ids[i]!r} at ts={int(ts_ms[i])} (batch position {i})"
            raise InputError(msg)

    @torch.no_grad()
    def process(self, device_ids: Sequence[str], ts_ms: np.ndarray, values: np.ndarray) -> StepResult:
        """Apply a batch of readings (``ts_ms`` int64 epoch ms [N], ``values`` float32 [N, C])."""
        raw_ts = np.asarray(ts_ms)
        if raw_ts.dtype.kind == "f" and raw_ts.shape == (len(device_ids),) and not np.isfinite(raw_ts).all():
            i = int(np.flatnonzero(~np.isfinite(raw_ts))[0])
            msg = f"non-finite event time for device {device_ids[i]!r} (batch position {i})"
            raise InputError(msg)
        ts_ms = raw_ts.astype(np.int64, copy=False)
        values = np.asarray(values, dtype=np.float32)
        self._validate(device_ids, ts_ms, values)
        n, c = len(device_ids), self.n_channels
        if n == 0:
            return StepResult.empty(c)
        rows, _ = self.store.rows_for(device_ids)
        host = self.store.host
        plan = plan_waves(rows, ts_ms, host["last_ts_ms"], host["count"], self.settings)
        m = plan.source.shape[0]
        # Wave-ordered inputs as two blocks (one host-to-device copy each, pinned on CUDA): float32
        # [M, C + 1] = values | dt (seconds); int64 [4, M] = store row | event time ms | count before | reset.
        fl = np.empty((m, c + 1), np.float32)
        np.take(values, plan.source, axis=0, out=fl[:, :c])
        fl[:, c] = plan.dt_s
        ints = np.empty((4, m), np.int64)
        ints[0], ints[2], ints[3] = plan.rows, plan.count_before, plan.reset
        np.take(ts_ms, plan.source, out=ints[1])
        fl_t, ints_t = self._to_device(fl), self._to_device(ints)
        out_f = torch.empty(m, _OUT_F * c + _OUT_S, device=self.device)  # forecast | std | z | horizon, score, thr
        out_b = torch.empty(m, 3, dtype=torch.int8, device=self.device)  # in_alert | opened | reason
        for k in range(plan.n_waves):
            lo, hi = int(plan.bounds[k]), int(plan.bounds[k + 1])
            self._wave(ints_t[0, lo:hi], fl_t[lo:hi, :c], ints_t[1, lo:hi], fl_t[lo:hi, c], ints_t[2, lo:hi],
                       ints_t[3, lo:hi] != 0, out_f[lo:hi], out_b[lo:hi])
        # Device clocks and counters advance on the host, where the policies read them.
        np.maximum.at(host["last_ts_ms"], plan.rows, ints[1])
        np.add.at(host["count"], plan.rows, 1)
        return self._assemble(device_ids, ts_ms, plan.status, plan.long_gap, plan.source, out_f, out_b)

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self.device.type != "cuda":
            return t
        # Pinned staging copy, then an asynchronous host-to-device copy: torch's pinned-memory allocator keeps
        # the staging buffer until the copy on the stream has run.
        return t.pin_memory().to(self.device, non_blocking=True)

    def _wave(self, idx: torch.Tensor, x: torch.Tensor, ts: torch.Tensor, dt: torch.Tensor, cnt: torch.Tensor,
              reset: torch.Tensor, o_f: torch.Tensor, o_b: torch.Tensor) -> None:
        """One reading for each of B distinct devices: ``idx`` store rows, ``x`` float32 [B, C] raw values,
        ``ts`` int64 event time ms, ``dt`` float32 seconds since the previous applied reading, ``cnt`` readings
        applied before; writes the outputs into ``o_f`` / ``o_b`` (layouts as in :meth:`process`)."""
        s, store, model, c = self.settings, self.store, self.model, self.n_channels
        rows = store.gather(idx)  # one copy per dtype block; fields below are column views of it

        def f(name: str) -> torch.Tensor:
            return store.field(rows, name)

        first = cnt == 0
        h, x_last, mean, var, calib = f("h"), f("x_last"), f("mean"), f("var"), f("calib")
        # 1. forecast this reading from the state before it, at the real gap, and score it
        sc = scale(mean, var)
        mu, sd = model.forecast(h, torch.clamp((x_last - mean) / sc, -CLIP_Z, CLIP_Z), dt)
        x_z = (x - mean) / sc  # unclipped: the score must see how far out a reading is
        # Per-device, per-channel calibration of the model's spread: a device the model finds harder (or
        # easier) than average gets its own scale, so one threshold policy fits every device.
        score, z = self.scorer.score(x_z, mu, sd * torch.sqrt(calib))
        score = score.masked_fill(first, float("nan"))
        score_mean, score_var = f("score_mean"), f("score_var")
        thr = self.scorer.threshold(score_mean, score_var)
        # Saturating: only ">= stuck_after" matters, and int16 must not wrap on a sensor stuck for hours.
        stuck_run = torch.where((x == x_last) & ~first.unsqueeze(1), f("stuck").to(torch.int32) + 1, 0).clamp_(
            max=min(s.stuck_after, 32767)).to(torch.int16)
        stuck_ch = stuck_run >= s.stuck_after
        stuck = stuck_ch.any(dim=1)
        # Sustained deviation: short running mean of squared calibrated residuals (about 1 when normal),
        # clamped so that one spike is left to the instantaneous score.  The statistics are meaningless
        # while the device's normalisation settles, so they start half-way through warm-up.
        settle_at = max(s.warmup_events // 2, 2)
        settled = cnt >= settle_at
        z2 = torch.clamp((z * z).mean(dim=1), max=_Z2_CLAMP)
        fast = f("z2_fast")
        fast = torch.where(settled, fast + s.sustained_alpha * (z2 - fast), fast)
        warm = cnt >= s.warmup_events
        sustained = warm & (fast > s.sustained_ratio)
        level = x_z.abs().amax(dim=1)  # distance from the device's normal level, in its own std units
        level_high = warm & (level > s.level_sigma)
        # 2. alert state machine
        alert = self.scorer.step(
            AlertState(f("alert_open"), f("alert_since_ms"), f("cooldown_ms"), f("calm")),
            score, thr, stuck | sustained | level_high, ts, warm=warm, hold=level > s.hold_sigma)
        learn = alert.learn.unsqueeze(1)
        if s.learn_calm_channels:  # inside an alert, channels still near their level keep following slow drift
            learn = learn | (x_z.abs() < s.hold_sigma)
        # 3. statistics learn only outside alerts (a first reading always initialises them)
        new_mean, new_var = update_stats(mean, var, cnt, x, s.stats_alpha)
        if s.reference_events:  # a fixed reference: the scale (and with reference_level the level) stops learning
            in_ref = (cnt < s.reference_events).unsqueeze(1)
            new_var = torch.where(in_ref, new_var, var)
            if s.reference_level:
                new_mean = torch.where(in_ref, new_mean, mean)
        mean = torch.where(learn, new_mean, mean)
        var = torch.where(learn, new_var, var)
        # Winsorised at the threshold: a burst of outliers cannot drag the threshold up after itself.
        score_ok = alert.learn & settled
        n_settled = (cnt - settle_at + 1).to(calib.dtype).clamp(min=1.0)
        sm, sv = update_stats(score_mean.unsqueeze(1), score_var.unsqueeze(1), n_settled - 1,
                              torch.minimum(score, thr).nan_to_num(0.0).unsqueeze(1), s.stats_alpha)
        score_mean = torch.where(score_ok, sm.squeeze(1), score_mean)
        score_var = torch.where(score_ok, sv.squeeze(1), score_var)
        raw_z2 = torch.clamp(z * z * calib, max=_CALIB_CLAMP)  # squared residual in the model's own units
        w_cal = torch.clamp(1.0 / n_settled, min=s.stats_alpha).unsqueeze(1)
        calib = torch.clamp(torch.where(score_ok.unsqueeze(1), calib + w_cal * (raw_z2 - calib), calib),
                            min=_CALIB_MIN)
        # 4. fold the reading into the hidden state
        h = h.masked_fill(reset.unsqueeze(1), 0.0)
        sc = scale(mean, var)
        x_n = torch.clamp((x - mean) / sc, -CLIP_Z, CLIP_Z)
        h = model.advance(h, x_n, dt)
        gap = f("gap_ema")
        gap_dt = torch.clamp(dt, max=s.max_gap_s)
        gap = torch.where(first, _DEFAULT_GAP_S,
                          torch.where(dt <= 0, gap,  # a dt = 0 (accepted duplicate/late) says nothing of the rate
                                      torch.where(cnt == 1, gap_dt, gap + _GAP_ALPHA * (gap_dt - gap))))
        # 5. forecast the next reading at the usual gap, back in raw units
        mu2, sd2 = model.forecast(h, x_n, gap)
        o_f[:, :c] = mean + mu2 * sc
        o_f[:, c:2 * c] = sd2 * sc * torch.sqrt(calib)
        o_f[:, 2 * c:3 * c] = z.masked_fill(stuck_ch, float("inf"))
        o_f[:, 3 * c], o_f[:, 3 * c + 1], o_f[:, 3 * c + 2] = gap, score, thr
        o_b[:, 0], o_b[:, 1] = alert.in_alert, alert.opened
        o_b[:, 2] = torch.where(stuck, 1, torch.where(score > thr, 0, torch.where(sustained, 2, 3)))
        # 6. write the new values into the gathered rows, then scatter them back with one copy per block
        for name, value in (("h", h), ("x_last", x), ("mean", mean), ("var", var), ("calib", calib),
                            ("score_mean", score_mean), ("score_var", score_var), ("gap_ema", gap),
                            ("z2_fast", fast), ("stuck", stuck_run), ("alert_open", alert.state.open),
                            ("alert_since_ms", alert.state.since_ms), ("cooldown_ms", alert.state.cooldown_ms),
                            ("calm", alert.state.calm)):
            f(name).copy_(value)
        store.scatter(idx, rows)

    def _assemble(self, device_ids: Sequence[str], ts_ms: np.ndarray, status: np.ndarray, long_gap: np.ndarray,
                  source: np.ndarray, out_f: torch.Tensor, out_b: torch.Tensor) -> StepResult:
        n, c = len(device_ids), self.n_channels
        # One device-to-host copy per block, then one scatter into input order (NaN / False: not applied).
        res_f = np.full((n, out_f.shape[1]), np.nan, np.float32)
        res_f[source] = out_f.cpu().numpy()
        flags = out_b.cpu().numpy()
        in_alert = np.zeros(n, np.bool_)
        in_alert[source] = flags[:, 0] != 0
        res_score, res_thr = res_f[:, 3 * c + 1].copy(), res_f[:, 3 * c + 2].copy()
        alerts: list[Alert] = []
        opened_pos = np.flatnonzero(flags[:, 1])
        if opened_pos.size:
            k = min(self.settings.top_channels, c)
            z = torch.from_numpy(res_f[source[opened_pos], 2 * c:3 * c].copy())
            top = torch.topk(z, k, dim=1).indices.numpy()
            for j, p in enumerate(opened_pos.tolist()):
                i = int(source[p])
                sc, th = float(res_score[i]), float(res_thr[i])
                alerts.append(Alert(device_ids[i], int(ts_ms[i]), sc, th,
                                    self.scorer.severity(sc, th), tuple(int(ch) for ch in top[j]),
                                    _REASONS[int(flags[p, 2])], i))
        alerts.sort(key=lambda a: a.index)  # input order, not wave order
        return StepResult(status=status, long_gap=long_gap, forecast=np.ascontiguousarray(res_f[:, :c]),
                          forecast_std=np.ascontiguousarray(res_f[:, c:2 * c]), horizon_s=res_f[:, 3 * c].copy(),
                          score=res_score, threshold=res_thr, is_alert=in_alert, ts_ms=ts_ms, alerts=alerts)
