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
from operators.normalization import normalise, scale, update_stats
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
        dev = self.device
        x_all = torch.as_tensor(values[plan.source], device=dev)
        ts_all = torch.as_tensor(ts_ms[plan.source], device=dev)
        dt_all = torch.as_tensor(plan.dt_s, device=dev)
        rows_all = torch.as_tensor(plan.rows, device=dev)
        cnt_all = torch.as_tensor(plan.count_before, device=dev)
        reset_all = torch.as_tensor(plan.reset, device=dev)
        out_f = torch.empty(m, c, device=dev)
        out_sd = torch.empty(m, c, device=dev)
        out_h = torch.empty(m, device=dev)
        out_score = torch.empty(m, device=dev)
        out_thr = torch.empty(m, device=dev)
        out_alert = torch.empty(m, dtype=torch.bool, device=dev)
        out_open = torch.empty(m, dtype=torch.bool, device=dev)
        out_reason = torch.empty(m, dtype=torch.int8, device=dev)
        out_z = torch.empty(m, c, device=dev)
        for k in range(plan.n_waves):
            sl = slice(int(plan.bounds[k]), int(plan.bounds[k + 1]))
            self._wave(rows_all[sl], x_all[sl], ts_all[sl], dt_all[sl], cnt_all[sl], reset_all[sl],
                       out_f[sl], out_sd[sl], out_h[sl], out_score[sl], out_thr[sl], out_alert[sl],
                       out_open[sl], out_reason[sl], out_z[sl])
        # Device clocks and counters advance on the host, where the policies read them.
        np.maximum.at(host["last_ts_ms"], plan.rows, ts_ms[plan.source])
        np.add.at(host["count"], plan.rows, 1)
        return self._assemble(device_ids, ts_ms, plan.status, plan.long_gap, plan.source, out_f, out_sd, out_h,
                              out_score, out_thr, out_alert, out_open, out_reason, out_z)

    def _wave(self, idx: torch.Tensor, x: torch.Tensor, ts: torch.Tensor, dt: torch.Tensor, cnt: torch.Tensor,
              reset: torch.Tensor, o_f: torch.Tensor, o_sd: torch.Tensor, o_h: torch.Tensor,
              o_score: torch.Tensor, o_thr: torch.Tensor, o_alert: torch.Tensor, o_open: torch.Tensor,
              o_reason: torch.Tensor, o_z: torch.Tensor) -> None:
        s, st, model = self.settings, self.store.tensors, self.model
        first = cnt == 0
        h, x_last, mean, var = st["h"][idx], st["x_last"][idx], st["mean"][idx], st["var"][idx]
        # 1. forecast this reading from the state before it, at the real gap, and score it
        mu, sd = model.forecast(h, normalise(x_last, mean, var), dt)
        x_z = (x - mean) / scale(mean, var)  # unclipped: the score must see how far out a reading is
        # Per-device, per-channel calibration of the model's spread: a device the model finds harder (or
        # easier) than average gets its own scale, so one threshold policy fits every device.
        calib = st["calib"][idx]
        score, z = self.scorer.score(x_z, mu, sd * torch.sqrt(calib))
        score = torch.where(first, torch.full_like(score, float("nan")), score)
        thr = self.scorer.threshold(st["score_mean"][idx], st["score_var"][idx])
        stuck_run = torch.where((x == x_last) & ~first.unsqueeze(1), st["stuck"][idx] + 1, 0).to(torch.int16)
        stuck = (stuck_run >= s.stuck_after).any(dim=1)
        # Sustained deviation: short running mean of squared calibrated residuals (about 1 when normal),
        # clamped so that one spike is left to the instantaneous score.  The statistics are meaningless
        # while the device's normalisation settles, so they start half-way through warm-up.
        settled = cnt >= max(s.warmup_events // 2, 2)
        z2 = torch.clamp((z * z).mean(dim=1), max=_Z2_CLAMP)
        fast = st["z2_fast"][idx]
        fast = torch.where(settled, fast + s.sustained_alpha * (z2 - fast), fast)
        warm = cnt >= s.warmup_events
        sustained = warm & (fast > s.sustained_ratio)
        level = x_z.abs().amax(dim=1)  # distance from the device's normal level, in its own std units
        level_high = warm & (level > s.level_sigma)
        # 2. alert state machine
        alert = self.scorer.step(
            AlertState(st["alert_open"][idx], st["alert_since_ms"][idx], st["cooldown_ms"][idx], st["calm"][idx]),
            score, thr, stuck | sustained | level_high, ts, warm=warm, hold=level > s.hold_sigma)
        learn = alert.learn.unsqueeze(1)
        # 3. statistics learn only outside alerts (a first reading always initialises them)
        new_mean, new_var = update_stats(mean, var, cnt, x, s.stats_alpha)
        mean = torch.where(learn, new_mean, mean)
        var = torch.where(learn, new_var, var)
        # Winsorised at the threshold: a burst of outliers cannot drag the threshold up after itself.
        score_ok = alert.learn & settled
        n_settled = (cnt - max(s.warmup_events // 2, 2) + 1).to(calib.dtype).clamp(min=1.0)
        sm, sv = update_stats(st["score_mean"][idx].unsqueeze(1), st["score_var"][idx].unsqueeze(1),
                              n_settled - 1, torch.minimum(score, thr).nan_to_num(0.0).unsqueeze(1),
                              s.stats_alpha)
        st["score_mean"][idx] = torch.where(score_ok, sm.squeeze(1), st["score_mean"][idx])
        st["score_var"][idx] = torch.where(score_ok, sv.squeeze(1), st["score_var"][idx])
        raw_z2 = torch.clamp(z * z * calib, max=_CALIB_CLAMP)  # squared residual in the model's own units
        w_cal = torch.clamp(1.0 / n_settled, min=s.stats_alpha).unsqueeze(1)
        calib = torch.where(score_ok.unsqueeze(1), calib + w_cal * (raw_z2 - calib), calib)
        st["calib"][idx] = torch.clamp(calib, min=_CALIB_MIN)
        st["z2_fast"][idx] = fast
        # 4. fold the reading into the hidden state
        h = torch.where(reset.unsqueeze(1), torch.zeros_like(h), h)
        x_n = normalise(x, mean, var)
        h = model.advance(h, x_n, dt)
        gap = st["gap_ema"][idx]
        gap_dt = torch.clamp(dt, max=s.max_gap_s)
        gap = torch.where(first, torch.full_like(gap, _DEFAULT_GAP_S),
                          torch.where(dt <= 0, gap,  # a dt = 0 (accepted duplicate/late) says nothing of the rate
                                      torch.where(cnt == 1, gap_dt, gap + _GAP_ALPHA * (gap_dt - gap))))
        # 5. forecast the next reading at the usual gap, back in raw units
        mu2, sd2 = model.forecast(h, x_n, gap)
        sc = scale(mean, var)
        o_f.copy_(mean + mu2 * sc)
        o_sd.copy_(sd2 * sc * torch.sqrt(st["calib"][idx]))
        o_h.copy_(gap)
        o_score.copy_(score)
        o_thr.copy_(thr)
        o_alert.copy_(alert.in_alert)
        o_open.copy_(alert.opened)
        o_reason.copy_(torch.where(stuck, 1, torch.where(score > thr, 0, torch.where(sustained, 2, 3))).to(torch.int8))
        o_z.copy_(torch.where(stuck_run >= s.stuck_after, float("inf"), z))
        # 6. scatter back
        st["h"][idx], st["x_last"][idx], st["mean"][idx], st["var"][idx] = h, x, mean, var
        st["gap_ema"][idx], st["stuck"][idx] = gap, stuck_run
        st["alert_open"][idx], st["alert_since_ms"][idx] = alert.state.open, alert.state.since_ms
        st["cooldown_ms"][idx], st["calm"][idx] = alert.state.cooldown_ms, alert.state.calm

    def _assemble(self, device_ids: Sequence[str], ts_ms: np.ndarray, status: np.ndarray, long_gap: np.ndarray,
                  source: np.ndarray, f: torch.Tensor, sd: torch.Tensor, hz: torch.Tensor, score: torch.Tensor,
                  thr: torch.Tensor, in_alert: torch.Tensor, opened: torch.Tensor, reason: torch.Tensor,
                  z: torch.Tensor) -> StepResult:
        n, c = len(device_ids), self.n_channels

        def scatter(t: torch.Tensor, fill: float | bool, shape: tuple[int, ...], dtype: type) -> np.ndarray:
            arr: np.ndarray = np.full(shape, fill, dtype=dtype)
            arr[source] = t.cpu().numpy()
            return arr

        nan = float("nan")
        res_score = scatter(score, nan, (n,), np.float32)
        res_thr = scatter(thr, nan, (n,), np.float32)
        alerts: list[Alert] = []
        opened_pos = torch.nonzero(opened).flatten()
        if opened_pos.numel():
            k = min(self.settings.top_channels, c)
            top = torch.topk(z[opened_pos], k, dim=1).indices.cpu().numpy()
            reason_np = reason[opened_pos].cpu().numpy()
            for j, p in enumerate(opened_pos.cpu().numpy().tolist()):
                i = int(source[p])
                sc, th = float(res_score[i]), float(res_thr[i])
                alerts.append(Alert(device_ids[i], int(ts_ms[i]), sc, th,
                                    self.scorer.severity(sc, th), tuple(int(ch) for ch in top[j]),
                                    _REASONS[int(reason_np[j])], i))
        alerts.sort(key=lambda a: a.index)  # input order, not wave order
        return StepResult(status=status, long_gap=long_gap, forecast=scatter(f, nan, (n, c), np.float32),
                          forecast_std=scatter(sd, nan, (n, c), np.float32),
                          horizon_s=scatter(hz, nan, (n,), np.float32), score=res_score, threshold=res_thr,
                          is_alert=scatter(in_alert, False, (n,), np.bool_), ts_ms=ts_ms, alerts=alerts)
