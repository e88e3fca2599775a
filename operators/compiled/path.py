"""The compiled step's Python side: which models and batches it serves, and one kernel call per batch.

A wave costs about thirty tensor operations whatever its width, so a batch of few devices with many readings
each (a chatty device, a backlog) is bound by per-operation overhead.  The kernel
(:func:`~liquidstream.operators.compiled.kernel.run_devices`) instead runs each device's run of readings in one
compiled loop, updating the state store's blocks in place.  :class:`CompiledStep` packs what the kernel reads:
the model's weights (transposed, biases as a last row; rebuilt when a parameter changes), the settings and the
step's constants, the store's field columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from liquidstream.operators.cells import CfCCell, LiquidCell, LTCCell
from liquidstream.operators.cells._common import DerivedWeights
from liquidstream.operators.compiled import kernel as k
from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.fused_step import CALIB_CLAMP, CALIB_MIN, DEFAULT_GAP_S, GAP_ALPHA, SCORE_HALF
from liquidstream.operators.layout import FLAG_ROWS, OutputRows
from liquidstream.operators.normalization import CLIP_Z
from liquidstream.operators.result import AlertReason
from liquidstream.operators.scoring import (
    CAL_ALPHA,
    CAL_FLOOR,
    CAL_P,
    LOG10_CAL_P,
    LONG_ALPHA,
    MIN_READINGS,
    S2_CLIP,
    S2_FLOOR,
    SHORT_ALPHA,
    AnomalyScorer,
)
from liquidstream.operators.state.store import DeviceStateStore

#: ``step_path="auto"`` takes the compiled step for a batch with at least this many applied readings per distinct
#: device (mean), the tensor waves otherwise.  Measured with ``benchmarks/fleet_shapes.py --crossover`` (one torch
#: thread, 8 channels, hidden 64, batches of 10,000, the shared 2-core box; docs/performance.md, "Fleet shapes"):
#: per CPU second the compiled step is 1.1-1.5x the tensor waves at 2-3 readings per device and 1.2-2.6x from 4
#: up; at one reading per device it is level or slightly ahead (1.02, 1.19, 1.24x in three runs) on one thread,
#: but there the tensor waves' matrix products can use more torch threads and the compiled loop cannot (not
#: measured on this box): 1.5 keeps batches of one reading per device on the tensor path.
COMPILED_MIN_READINGS_PER_DEVICE = 1.5
#: The head's softplus shift: softplus(0.5413) = 1, unit spread at initialisation (Forecaster.forecast_all).
_STD_SHIFT = 0.5413
_F32 = np.float32
_run_devices: Callable[..., None] = k.run_devices  # (numba's dispatcher, typed as what it is called with)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=_F32)


def compiled_cell(model: Forecaster) -> int | None:
    """The kernel's cell kind for ``model``, or None when the compiled step cannot run it (CfC modes other than
    ``default`` or without a backbone layer, a head built otherwise): those stay on the tensor path.

    >>> compiled_cell(Forecaster(2, 4).eval()), compiled_cell(Forecaster(2, 4, cell="ltc").eval())
    (0, 2)
    >>> compiled_cell(Forecaster(2, 4, cell_options={"mode": "pure"}).eval()) is None
    True
    """
    layers = tuple(model.head)
    if len(layers) != 3 or not (isinstance(layers[0], nn.Linear) and isinstance(layers[1], nn.SiLU)
                                and isinstance(layers[2], nn.Linear)):
        return None
    cell = model.cell
    if isinstance(cell, CfCCell) and cell.serves_columns():
        return k.CELL_CFC
    if isinstance(cell, LiquidCell):
        return k.CELL_LIQUID
    if isinstance(cell, LTCCell):
        return k.CELL_LTC
    return None


def _cell_weights(model: Forecaster) -> list[np.ndarray]:
    """c0h, c0x, cmid, chead, ctau, lsyn, lsens, lvec, lmap for the kernel (see its docstring); the arrays a cell
    does not use are small placeholders."""
    cell, n = model.cell, model.hidden_size
    c0h, c0x, cmid = np.zeros((n, 1), _F32), np.zeros((1, 1), _F32), np.zeros((0, 2, 1), _F32)
    chead, ctau = np.zeros((1, 4 * n), _F32), np.ones(n, _F32)
    lsyn, lsens, lmap = np.zeros((4, 1, n), _F32), np.zeros((4, 1, n), _F32), np.zeros((2, 1), _F32)
    lvec = np.zeros((3, n), _F32)
    if isinstance(cell, LiquidCell):
        c0x = _np(torch.cat([cell.input_map.weight.t(), cell.input_map.bias.unsqueeze(0)]))
        c0h, ctau = _np(cell.recurrent.weight.t()), _np(cell.tau())
    elif isinstance(cell, LTCCell):
        p = cell.effective_parameters()
        lsyn = np.stack([_np(p["sigma"]), _np(-(p["sigma"] * p["mu"])), _np(p["w"] * p["erev"]), _np(p["w"])])
        lsens = np.stack([_np(p["sensory_sigma"]), _np(-(p["sensory_sigma"] * p["sensory_mu"])),
                          _np(p["sensory_w"] * p["sensory_erev"]), _np(p["sensory_w"])])
        lvec = np.stack([_np(p["cm"]), _np(p["gleak"]), _np(p["vleak"])])
        ones = torch.ones(cell.input_size)
        scale = cell.input_w if cell.input_mapping != "none" else ones
        shift = cell.input_b if cell.input_mapping == "affine" else torch.zeros_like(ones)
        lmap = np.stack([_np(scale), _np(shift)])
    else:
        assert isinstance(cell, CfCCell)  # noqa: S101 (compiled_cell chose the kind)
        w = cell.column_weights()
        units = w[0].shape[0]
        cmid = np.stack([_np(m.t()) for m in w[2:-1]]) if len(w) > 3 else np.zeros((0, units + 1, units), _F32)
        c0h, c0x, chead = _np(w[0].t()), _np(w[1].t()), _np(w[-1].t())
    return [c0h, c0x, cmid, chead, ctau, lsyn, lsens, lvec, lmap]


def _head_weights(model: Forecaster) -> list[np.ndarray]:
    """hh, hx, ho: the forecast head's first layer (h part; x, dt feature and bias part) and its last layer."""
    first, _, last = tuple(model.head)
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)  # noqa: S101 (compiled_cell checked)
    n_h = model.hidden_size
    return [_np(first.weight[:, :n_h].t()), _np(torch.cat([first.weight[:, n_h:].t(), first.bias.unsqueeze(0)])),
            _np(torch.cat([last.weight.t(), last.bias.unsqueeze(0)]))]


class CompiledStep:
    """Runs batches through the compiled kernel for one operator (its settings, scorer and state store)."""

    def __init__(self, settings: OperatorSettings, scorer: AnomalyScorer, store: DeviceStateStore) -> None:
        self.settings, self.store = settings, store
        s = settings
        self._fset = np.zeros(k.F_SIZE, np.float64)
        for idx, value in ((k.F_STATS_ALPHA, s.stats_alpha), (k.F_MAX_GAP, s.max_gap_s),
                           (k.F_THRESHOLD, scorer.threshold), (k.F_LOG10_CALM, math.log10(100.0 * s.alert_probability)),
                           (k.F_CLIP_Z, CLIP_Z), (k.F_SHORT_ALPHA, SHORT_ALPHA), (k.F_LONG_ALPHA, LONG_ALPHA),
                           (k.F_S2_FLOOR, S2_FLOOR), (k.F_S2_CLIP, S2_CLIP), (k.F_CAL_P, CAL_P),
                           (k.F_CAL_ALPHA, CAL_ALPHA), (k.F_CAL_FLOOR, CAL_FLOOR), (k.F_LOG10_CAL_P, LOG10_CAL_P),
                           (k.F_GAP_ALPHA, GAP_ALPHA), (k.F_CALIB_CLAMP, CALIB_CLAMP), (k.F_CALIB_MIN, CALIB_MIN),
                           (k.F_DEFAULT_GAP, DEFAULT_GAP_S), (k.F_SCORE_HALF, SCORE_HALF), (k.F_STD_SHIFT, _STD_SHIFT)):
            self._fset[idx] = value
        self._iset = np.zeros(k.I_SIZE, np.int64)
        for idx, ivalue in ((k.I_COMMISSIONING, s.commissioning_events), (k.I_WARMUP, s.warmup_events),
                            (k.I_STUCK_AFTER, s.stuck_after), (k.I_EXIT_AFTER, s.exit_after),
                            (k.I_MAX_ALERT, s.max_alert_events), (k.I_COOLDOWN, s.cooldown_events),
                            (k.I_STUCK_RULE, s.stuck_rule), (k.I_LEVEL_RULE, s.level_rule),
                            (k.I_MIN_READINGS, MIN_READINGS), (k.I_R_LIK, AlertReason.ANOMALY_LIKELIHOOD.code),
                            (k.I_R_STUCK, AlertReason.STUCK_SENSOR.code),
                            (k.I_R_LEVEL, AlertReason.LEVEL_DEVIATION.code)):
            self._iset[idx] = int(ivalue)
        col = {name: store.columns[name][0] for name in store.columns}
        self._off = np.array([col[name] for name in ("h", "x_last", "mean", "var", "gap_ema", "calib", "alert_peak",
                                                     "lik_n", "commissioning", "alert_age", "cooldown", "calm",
                                                     "alert_open", "repeats", "alert_reason", "stuck")], np.int64)
        self._col = col
        self._weights = DerivedWeights()

    def _likelihoods(self, model: Forecaster) -> np.ndarray:
        """int64 [K, 6]: the likelihoods the tensor path scores, in its order (delta, absolute, level)."""
        keys = []
        if self.settings.model_triggers:
            keys.append(("d", 0))
            if model.absolute_head:
                keys.append(("a", 1))
        if self.settings.level_rule:
            keys.append(("l", 2))
        return np.array([[self._col[f"{key}_{f}"] for f in ("s2", "m", "mu", "v", "cal")] + [kind]
                         for key, kind in keys], np.int64)

    def run(self, model: Forecaster, cell_kind: int, values: np.ndarray, source: np.ndarray, dt_s: np.ndarray,
            count_before: np.ndarray, reset: np.ndarray, device_order: np.ndarray, device_rows: np.ndarray,
            device_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply a planned batch (:class:`~liquidstream.operators.waves.WavePlan` arrays: ``source``, ``dt_s``,
        ``count_before``, ``reset`` in wave order) to the store; returns the output blocks float32 [3C + 6, M]
        and int8 [4, M] as the tensor path's waves write them, but with the columns device by device
        (``device_order``): each reading's outputs go to the next column instead of one scattered over the block
        (about 4 % of the kernel's time at 200 devices, median of six batches, within the shared box's noise)."""
        m, c = source.shape[0], model.n_channels
        weights = self._weights.get(list(model.parameters()), lambda: [
            torch.from_numpy(a) for a in _cell_weights(model) + _head_weights(model)])
        lik = self._likelihoods(model)
        fset, iset = self._fset.copy(), self._iset.copy()
        fset[k.F_TIME_SCALE], fset[k.F_MIN_STD] = model.time_scale_s, model.min_std
        fset[k.F_LOG10_K] = math.log10(max(lik.shape[0], 1))
        iset[k.I_CELL] = cell_kind
        if isinstance(model.cell, LTCCell):
            fset[k.F_LTC_EPS], iset[k.I_LTC_UNFOLDS] = model.cell.epsilon, model.cell.ode_unfolds
        iset[k.I_LECUN] = isinstance(model.cell, CfCCell) and model.cell.backbone_activation == "lecun_tanh"
        out_f = np.empty((OutputRows(c).float_rows, m), _F32)
        out_b = np.empty((FLAG_ROWS, m), np.int8)
        blocks = self.store.blocks
        _run_devices(device_starts, device_rows, np.arange(m), values[source[device_order]],
                      dt_s[device_order], count_before[device_order], reset[device_order],
                      blocks[torch.float32].numpy(), blocks[torch.int32].numpy(), blocks[torch.bool].numpy(),
                      blocks[torch.int16].numpy(), self._off, lik, fset, iset,
                      *(w.numpy() for w in weights), out_f, out_b)
        return out_f, out_b


def warm_up() -> float:
    """Compile the kernel (or load it from numba's on-disk cache) now, instead of on the first narrow batch;
    returns the seconds it took.  The image build calls it (deploy/Dockerfile) so that a fresh worker loads
    machine code instead of compiling for tens of seconds.

    >>> warm_up() >= 0.0
    True
    """
    import time

    from liquidstream.operators.waves import plan_waves

    start = time.perf_counter()
    model = Forecaster(n_channels=1, hidden_size=2, head_units=2, cell_options={"backbone_units": 2}).eval()
    settings = OperatorSettings(step_path="compiled")
    store = DeviceStateStore(2, 1, initial_capacity=1)
    rows, _ = store.rows_for(["warm-up", "warm-up"])
    plan = plan_waves(rows, np.array([0, 1000]), store.host["last_ts_ms"], store.host["count"], settings)
    kind = compiled_cell(model)
    assert kind is not None  # noqa: S101 (the default model)
    CompiledStep(settings, AnomalyScorer(settings), store).run(
        model, kind, np.zeros((2, 1), np.float32), plan.source, plan.dt_s, plan.count_before, plan.reset,
        plan.device_order, plan.last_rows, plan.device_starts)
    return time.perf_counter() - start
