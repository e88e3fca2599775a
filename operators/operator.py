"""The batched step operator: columnar readings in, forecasts, scores and alerts out.

``process`` takes a whole batch (any interleaving of devices), plans it into waves on the host
(:mod:`liquidstream.operators.waves`), then runs one cell call per wave over all devices in that wave, gathering and
scattering their rows in the :class:`~liquidstream.operators.state.store.DeviceStateStore`.  Per wave: forecast the
reading from the state *before* it (at the real gap), turn its residuals into a tail probability (the anomaly
likelihoods of :mod:`liquidstream.operators.scoring`), run the alert state machine, update the running
statistics (unless inside an alert), fold the reading into the hidden state, and forecast the next reading at
the device's usual gap.  A batch of many readings of few devices takes the compiled per-device step instead
(:mod:`liquidstream.operators.compiled`, same results): ``OperatorSettings.step_path`` says when.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from liquidstream.operators.asof import InstantForecast, forecast_at
from liquidstream.operators.compiled import COMPILED_MIN_READINGS_PER_DEVICE, CompiledStep, compiled_cell
from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.errors import InputError
from liquidstream.operators.explain import explain
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.fused_step import run_wave
from liquidstream.operators.layout import FLAG_CLOSED, FLAG_IN_ALERT, FLAG_OPENED, FLAG_REASON, FLAG_ROWS, OutputRows
from liquidstream.operators.result import Alert, AlertClosed, AlertReason, StepResult
from liquidstream.operators.scoring import AnomalyScorer
from liquidstream.operators.silence import Silence, SilenceWatch
from liquidstream.operators.state.fields import LEVEL_FIELDS
from liquidstream.operators.state.store import DeviceStateStore
from liquidstream.operators.waves import WavePlan, plan_waves


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
                                      device=self.device,
                                      extra_fields=LEVEL_FIELDS if settings.level_rule else ())
        self.silence = SilenceWatch(self.store, settings.silence_after_gaps) if settings.silence_after_gaps else None
        self._compiled = CompiledStep(settings, self.scorer, self.store)
        self._cell_kind = self._compiled_kind()
        #: Which path computed the last batch: ``"tensor"`` or ``"compiled"`` (``""`` before the first).
        self.last_step_path = ""

    def _compiled_kind(self) -> int | None:
        """The compiled kernel's cell kind for this model, or None where the tensor path must run."""
        if self.settings.step_path == "tensor" or self.device.type != "cpu":
            return None
        return compiled_cell(self.model)

    def _takes_compiled(self, plan: WavePlan) -> bool:
        """Whether this batch takes the compiled step: by its shape, readings per distinct device."""
        if self._cell_kind is None or plan.source.size == 0:
            return False
        return (self.settings.step_path == "compiled"
                or plan.source.shape[0] >= COMPILED_MIN_READINGS_PER_DEVICE * plan.last_rows.shape[0])

    def swap_model(self, model: Forecaster, version: str) -> None:
        """Serve a new model from the next call on (call between batches); device state is kept."""
        if model.hidden_size != self.model.hidden_size or model.n_channels != self.n_channels:
            msg = "a swapped-in model must keep hidden_size and n_channels"
            raise InputError(msg)
        self.model = model.to(self.device).eval()
        self.model_version = version
        self._cell_kind = self._compiled_kind()

    def set_commissioning(self, device_ids: Sequence[str], counts: Sequence[int] | np.ndarray) -> None:
        """Give each device its own commissioning length, in readings from its first (instead of
        ``settings.commissioning_events``): a benchmark file, a device commissioned for longer.  Devices not
        yet in the store get a row now (and count as idle to ``evict_idle`` until their first reading).

        >>> op = LiquidOperator(Forecaster(n_channels=1, hidden_size=4), OperatorSettings())
        >>> op.set_commissioning(["a", "b"], [300, 0])
        >>> op.store.tensors["commissioning"][op.store.lookup(["a", "b"])].tolist()
        [300, 0]
        """
        n = np.asarray(counts, dtype=np.int64)
        if n.shape != (len(device_ids),) or (n < 0).any() or (n >= 2**31).any():
            msg = f"expected {len(device_ids)} commissioning counts in [0, 2**31), got {n.tolist()!r}"
            raise InputError(msg)
        rows, _ = self.store.rows_for(device_ids)
        idx = torch.as_tensor(rows, device=self.device)
        self.store.tensors["commissioning"][idx] = torch.as_tensor(n, dtype=torch.int32, device=self.device)

    def forecast_at(self, device_ids: Sequence[str], ts_ms: np.ndarray | Sequence[int]) -> InstantForecast:
        """Each device's forecast at its instant ``ts_ms`` (int64 epoch ms, at or after its last reading): the
        forecast a reading arriving then would be scored against; changes no state (see
        :mod:`liquidstream.operators.asof`).

        >>> op = LiquidOperator(Forecaster(n_channels=1, hidden_size=4), OperatorSettings())
        >>> _ = op.process(["a", "a"], np.array([1000, 2000]), np.array([[1.0], [3.0]], dtype=np.float32))
        >>> now = op.forecast_at(["a"], [5000])
        >>> now.dt_s.tolist(), now.forecast.shape, now.last_ts_ms.tolist()
        ([3.0], (1, 1), [2000])
        """
        return forecast_at(self.model, self.store, self.settings, self.model_version, device_ids, ts_ms)

    def evict_idle(self, now_ms: int) -> list[str]:
        return self.store.evict_idle(now_ms, self.settings.state_ttl_s)

    def open_alerts(self, device_ids: Sequence[str]) -> list[AlertClosed]:
        """The alerts open on ``device_ids``, as they would close now with no further reading (``evicted``, at
        each device's last reading): what to publish before their state is dropped.  Changes no state.

        >>> op = LiquidOperator(Forecaster(n_channels=1, hidden_size=4), OperatorSettings())
        >>> _ = op.process(["a"], np.array([1_000]), np.zeros((1, 1), np.float32))
        >>> op.open_alerts(["a", "unknown"])
        []
        """
        rows = self.store.lookup(device_ids)
        known = np.flatnonzero(rows >= 0)
        idx = torch.as_tensor(rows[known], device=self.device)
        live = self.store.tensors["alert_open"][idx].cpu().numpy()
        out: list[AlertClosed] = []
        if not live.any():
            return out
        t = self.store.tensors
        peak, reason = t["alert_peak"][idx].cpu().numpy(), t["alert_reason"][idx].cpu().numpy()
        age, thr = t["alert_age"][idx].cpu().numpy(), self.scorer.threshold
        host = self.store.host
        for k in np.flatnonzero(live).tolist():
            row = int(rows[known[k]])
            p = float(peak[k])
            out.append(AlertClosed(device_ids[int(known[k])], int(host["alert_open_ms"][row]),
                                   int(host["last_ts_ms"][row]), p, thr, self.scorer.severity(p, thr),
                                   AlertReason.from_code(int(reason[k])), int(age[k]) + 1, False, -1, "evicted"))
        return out

    def check_silence(self, now_ms: int, device_ids: Sequence[str] | None = None) -> list[Alert]:
        """Open the silences of ``device_ids`` (default: every device) that started at or before ``now_ms``
        (stream time, epoch ms): devices quiet for ``silence_after_gaps`` of their usual gaps.  Each opens once,
        ``index`` -1, and closes with the device's next reading (:mod:`liquidstream.operators.silence`).

        >>> op = LiquidOperator(Forecaster(n_channels=1, hidden_size=4), OperatorSettings())
        >>> _ = op.process(["a"] * 30, 1_000 * np.arange(30), np.zeros((30, 1), np.float32))  # 1 s rhythm
        >>> op.check_silence(38_999), [(a.reason.value, a.ts_ms, a.score) for a in op.check_silence(39_500)]
        ([], [('silence', 39000, 10.5)])
        >>> op.check_silence(99_000)  # open already: once
        []
        """
        if self.silence is None:
            return []
        ids = self.store.device_ids() if device_ids is None else list(device_ids)
        rows = self.store.lookup(ids)
        by_row = {int(r): d for d, r in zip(ids, rows.tolist(), strict=True) if r >= 0}
        found = self.silence.check(int(now_ms), np.fromiter(by_row, np.int64, len(by_row)))
        return [silence_alert(by_row[s.row], s, int(now_ms), self.settings.silence_after_gaps, -1) for s in found]

    def _silences_ended(self, plan: WavePlan, ts_ms: np.ndarray) -> list[Silence]:
        """The silences this batch's readings end (and the rhythm learns the other gaps), before the clocks move."""
        if self.silence is None or plan.source.size == 0:
            return []
        return self.silence.observe(plan.rows, plan.source, ts_ms[plan.source], plan.dt_s)

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
        if self._takes_compiled(plan):
            assert self._cell_kind is not None  # noqa: S101 (checked by _takes_compiled)
            blocks = self._compiled.run(self.model, self._cell_kind, values, plan.source, plan.dt_s,
                                        plan.count_before, plan.reset, plan.device_order, plan.last_rows,
                                        plan.device_starts)
            out_f, out_b = torch.from_numpy(blocks[0]), torch.from_numpy(blocks[1])
            source, out_rows = plan.source[plan.device_order], plan.rows[plan.device_order]  # the blocks' columns
            self.last_step_path = "compiled"
        else:
            out_f, out_b = self._waves(plan, values, ts_ms)
            source, out_rows = plan.source, plan.rows
            self.last_step_path = "tensor"
        silences = self._silences_ended(plan, ts_ms)  # reads the clocks before this batch
        # Device clocks and counters advance on the host, where the policies read them.
        last = plan.last_rows
        host["last_ts_ms"][last] = np.maximum(host["last_ts_ms"][last], plan.last_ts_ms)
        host["count"][last] = plan.count_after
        result = self._assemble(device_ids, ts_ms, values, plan.status, plan.long_gap, source, out_rows, out_f, out_b)
        return with_silences(result, silences, device_ids, self.settings.silence_after_gaps)

    def _waves(self, plan: WavePlan, values: np.ndarray, ts_ms: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensor path: one :meth:`_wave` per reading rank; returns the output blocks in wave order."""
        m, c = plan.source.shape[0], self.n_channels
        # Wave-ordered inputs as two channels-first blocks (one host-to-device copy each, pinned on CUDA):
        # float32 [C + 1, M] = values | dt (seconds); int64 [4, M] = store row | event time ms | count before |
        # reset.  Outputs likewise, one row per quantity (see liquidstream.operators.fused_step for why channels first).
        fl = np.empty((c + 1, m), np.float32)
        fl[:c] = values[plan.source].T
        fl[c] = plan.dt_s
        ints = np.empty((4, m), np.int64)
        ints[0], ints[2], ints[3] = plan.rows, plan.count_before, plan.reset
        np.take(ts_ms, plan.source, out=ints[1])
        fl_t, ints_t = self._to_device(fl), self._to_device(ints)
        out_f = torch.empty(OutputRows(c).float_rows, m, device=self.device)  # rows named by OutputRows
        out_b = torch.empty(FLAG_ROWS, m, dtype=torch.int8, device=self.device)  # in_alert | opened | reason | closed
        for k in range(plan.n_waves):
            lo, hi = int(plan.bounds[k]), int(plan.bounds[k + 1])
            reset = ints_t[3, lo:hi] != 0 if plan.reset[lo:hi].any() else None  # known on the host: no sync
            self._wave(ints_t[0, lo:hi], fl_t[:c, lo:hi], ints_t[1, lo:hi], fl_t[c, lo:hi], ints_t[2, lo:hi],
                       reset, out_f[:, lo:hi], out_b[:, lo:hi])
        return out_f, out_b

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self.device.type != "cuda":
            return t
        # Pinned staging copy, then an asynchronous host-to-device copy: torch's pinned-memory allocator keeps
        # the staging buffer until the copy on the stream has run.
        return t.pin_memory().to(self.device, non_blocking=True)

    def _wave(self, idx: torch.Tensor, x: torch.Tensor, ts: torch.Tensor, dt: torch.Tensor, cnt: torch.Tensor,
              reset: torch.Tensor | None, o_f: torch.Tensor, o_b: torch.Tensor) -> None:
        """One reading for each of B distinct devices, channels first (see
        :func:`liquidstream.operators.fused_step.run_wave`:
        ``x`` [C, B], ``o_f`` [3C + 4, B], ``o_b`` [3, B]; ``reset`` None when no row of the wave resets)."""
        run_wave(self.settings, self.scorer, self.model, self.store, idx, x, ts, dt, cnt, reset, o_f, o_b)

    def _assemble(self, device_ids: Sequence[str], ts_ms: np.ndarray, values: np.ndarray, status: np.ndarray,
                  long_gap: np.ndarray, source: np.ndarray, rows: np.ndarray, out_f: torch.Tensor,
                  out_b: torch.Tensor) -> StepResult:
        n, c = len(device_ids), self.n_channels
        layout = OutputRows(c)
        # One device-to-host copy per block, then one scatter into input order (NaN / False: not applied).
        res_f = np.full((n, out_f.shape[0]), np.nan, np.float32)
        res_f[source] = out_f.cpu().numpy().T
        flags = out_b.cpu().numpy()
        in_alert = np.zeros(n, np.bool_)
        in_alert[source] = flags[FLAG_IN_ALERT] != 0
        res_score, res_thr = res_f[:, layout.score].copy(), res_f[:, layout.threshold].copy()
        alerts: list[Alert] = []
        closed: list[AlertClosed] = []
        opened_pos = np.flatnonzero(flags[FLAG_OPENED])
        top = np.zeros((0, 0), np.int64)
        if opened_pos.size:
            k = min(self.settings.top_channels, c)
            z = torch.from_numpy(res_f[source[opened_pos], layout.z].copy())
            top = torch.topk(z, k, dim=1).indices.numpy()
        # Openings and closings in the blocks' column order (wave order, or device by device from the compiled
        # step: either way a device's readings in event time), so that an alert opened and closed within one
        # batch gets its own opening time; the opening time lives in the store (its id).
        opened_at = {int(p): j for j, p in enumerate(opened_pos.tolist())}
        open_ms = self.store.host["alert_open_ms"]
        for p in np.flatnonzero(flags[FLAG_OPENED] | flags[FLAG_CLOSED]).tolist():
            i, row = int(source[p]), int(rows[p])
            code = AlertReason.from_code(int(flags[FLAG_REASON, p]))
            if p in opened_at:
                open_ms[row] = ts_ms[i]
                sc, th = float(res_score[i]), float(res_thr[i])
                alerts.append(Alert(device_ids[i], int(ts_ms[i]), sc, th, self.scorer.severity(sc, th),
                                    tuple(int(ch) for ch in top[opened_at[p]]), code, i))
                continue
            readings = int(res_f[i, layout.alert_readings])
            peak, th = float(res_f[i, layout.alert_peak]), float(res_thr[i])
            closed.append(AlertClosed(device_ids[i], int(open_ms[row]), int(ts_ms[i]), peak, th,
                                      self.scorer.severity(peak, th), code, readings,
                                      readings >= self.settings.max_alert_events + 1, i))
            open_ms[row] = 0
        closed.sort(key=lambda a: a.index)
        alerts.sort(key=lambda a: a.index)  # input order, not wave order
        if alerts:
            where = {int(source[p]): int(rows[p]) for p in opened_pos.tolist()}
            alerts = explain(alerts, self.model, self.store, values, res_f, where)
        return StepResult(status=status, long_gap=long_gap, forecast=np.ascontiguousarray(res_f[:, layout.forecast]),
                          forecast_std=np.ascontiguousarray(res_f[:, layout.std]),
                          horizon_s=res_f[:, layout.horizon].copy(),
                          score=res_score, threshold=res_thr, is_alert=in_alert, ts_ms=ts_ms,
                          anomaly_score=res_f[:, layout.anomaly_score].copy(), alerts=alerts, closed=closed)


def with_silences(result: StepResult, silences: list[Silence], device_ids: Sequence[str], after: float) -> StepResult:
    """``result`` with the silences its readings ended: a closed record each (``resumed``), preceded by its opened
    record on the same reading when no check had noticed it."""
    if not silences:
        return result
    opened = [silence_alert(device_ids[s.index], s, s.end_ms, after, s.index) for s in silences if not s.noticed]
    ended = [AlertClosed(device_ids[s.index], s.start_ms, s.end_ms, s.gaps(s.end_ms), after,
                         silence_severity(s.gaps(s.end_ms), after), AlertReason.SILENCE, 1, False, s.index, "resumed")
             for s in silences]
    return dataclasses.replace(result, alerts=sorted([*result.alerts, *opened], key=lambda a: a.index),
                               closed=sorted([*result.closed, *ended], key=lambda a: a.index))


def silence_severity(gaps: float, after: float) -> str:
    """``critical`` once silent for twice ``silence_after_gaps`` usual gaps, else ``warning``."""
    return "critical" if gaps >= 2 * after else "warning"


def silence_alert(device_id: str, s: Silence, now_ms: int, after: float, index: int) -> Alert:
    """The opened record of a silence: ``ts`` its start, ``score`` the usual gaps silent by ``now_ms``."""
    gaps = round(s.gaps(now_ms), 3)
    return Alert(device_id, s.start_ms, gaps, after, silence_severity(gaps, after), (), AlertReason.SILENCE, index)
