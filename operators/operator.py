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

from collections.abc import Sequence

import numpy as np
import torch

from liquidstream.operators.compiled import COMPILED_MIN_READINGS_PER_DEVICE, CompiledStep, compiled_cell
from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.errors import InputError
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.fused_step import run_wave
from liquidstream.operators.layout import FLAG_CLOSED, FLAG_IN_ALERT, FLAG_OPENED, FLAG_REASON, FLAG_ROWS, OutputRows
from liquidstream.operators.result import Alert, AlertClosed, AlertReason, StepResult
from liquidstream.operators.scoring import AnomalyScorer
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
        # Device clocks and counters advance on the host, where the policies read them.
        last = plan.last_rows
        host["last_ts_ms"][last] = np.maximum(host["last_ts_ms"][last], plan.last_ts_ms)
        host["count"][last] = plan.count_after
        return self._assemble(device_ids, ts_ms, plan.status, plan.long_gap, source, out_rows, out_f, out_b)

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

    def _assemble(self, device_ids: Sequence[str], ts_ms: np.ndarray, status: np.ndarray, long_gap: np.ndarray,
                  source: np.ndarray, rows: np.ndarray, out_f: torch.Tensor, out_b: torch.Tensor) -> StepResult:
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
        return StepResult(status=status, long_gap=long_gap, forecast=np.ascontiguousarray(res_f[:, layout.forecast]),
                          forecast_std=np.ascontiguousarray(res_f[:, layout.std]),
                          horizon_s=res_f[:, layout.horizon].copy(),
                          score=res_score, threshold=res_thr, is_alert=in_alert, ts_ms=ts_ms,
                          anomaly_score=res_f[:, layout.anomaly_score].copy(), alerts=alerts, closed=closed)
