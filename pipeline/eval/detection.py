"""What ``evaluate nab`` and ``evaluate skab`` share: devices with a commissioning part, one forecaster trained on
those parts, the lockstep stream through the operator, and the ablations that show what carries the decision.

Every benchmark file is one device.  The first ``commissioning`` readings of each device are its commissioning
data (assumed normal, labels unused): the forecaster trains on them, pooled over devices, and the operator is
told each device's length (:meth:`~liquidstream.operators.operator.LiquidOperator.set_commissioning`, the
per-device form of the ``commissioning_events`` setting), as a user would for their own fleet.  All devices then
stream through one :class:`~liquidstream.operators.operator.LiquidOperator` in chunks of :data:`CHUNK` readings
per device: the operator applies a device's readings one at a time in event-time order, each scored against the
forecast made before it, so a chunk looks no further ahead than a worker's batch does.

Ablations, each a full run on the same data with the same operator defaults:

* ``full``: the operator defaults with the trained liquid forecaster (model likelihood and the learned stuck rule);
* ``rules_only``: the model-based triggers off (only the level rule, a likelihood of the reading against the
  device's normal level, and the stuck rule decide);
* ``model_only``: the level and stuck rules off (only the model's forecast residuals decide);
* ``persistence``: the untrained forecaster (its forecast is the last reading) in place of the trained one;
* ``gru``: a discrete GRU of the same size, trained the same way, in place of the liquid cell.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.training import HOLDOUT, Sequences, Trainer
from liquidstream.pipeline.eval.irregular.models import build_model

__all__ = ["ABLATIONS", "CHUNK", "Device", "Streamed", "forecast_mse", "mse_line", "run_ablations", "stream",
           "train_forecaster"]

#: Readings per device per ``process`` call (a worker's batch holds a few hundred readings per partition).
CHUNK = 256


@dataclass(frozen=True)
class Device:
    """One benchmark file as one device: event times (int64 epoch ms), readings (float32 [n, C])."""

    name: str
    ts_ms: np.ndarray
    values: np.ndarray
    commissioning: int  # the first readings, assumed normal: training data and the operator's reference
    normal: np.ndarray | None = None  # bool [n]: outside every labelled anomaly (forecast MSE only; never fitted)


@dataclass(frozen=True)
class Streamed:
    """Per-device outputs of one run, in each device's reading order."""

    anomaly_score: list[np.ndarray]  # float32 [n], in [0, 1]
    is_alert: list[np.ndarray]  # bool [n]: an alert is open right after the reading
    forecast: list[np.ndarray]  # float32 [n, C]: forecast of the device's next reading


def train_forecaster(devices: Sequence[Device], *, kind: str, hidden_size: int, epochs: int, stats_alpha: float,
                     device: str, seed: int = 0) -> Forecaster:
    """A forecaster (``kind``: a liquid cell, or ``gru``) trained on the pooled commissioning parts."""
    torch.manual_seed(seed)
    ids = [d.name for d in devices for _ in range(d.commissioning)]
    seqs = Sequences.from_columns(ids, np.concatenate([d.ts_ms[:d.commissioning] for d in devices]),
                                  np.concatenate([d.values[:d.commissioning] for d in devices]))
    c = devices[0].values.shape[1]
    if kind == "gru":
        model = build_model("gru", c, hidden_size, absolute_head=True)
        model.time_scale_s = seqs.typical_gap_s()
    else:
        options: dict[str, object] = {"backbone_units": hidden_size} if kind == "cfc" else {}
        model = Forecaster(n_channels=c, hidden_size=hidden_size, cell=kind, cell_options=options,
                           time_scale_s=seqs.typical_gap_s())
    Trainer(model, window=32, lr=3e-3, stats_alpha=stats_alpha, seed=seed, device=device).fit(
        seqs, epochs, holdout=HOLDOUT)
    return model.eval()


def stream(op: LiquidOperator, devices: Sequence[Device], chunk: int = CHUNK) -> Streamed:
    """Every device through ``op``, ``chunk`` readings of each per call, in order; nothing looks ahead."""
    scores = [np.full(len(d.ts_ms), np.nan, np.float32) for d in devices]
    alerts = [np.zeros(len(d.ts_ms), bool) for d in devices]
    forecasts = [np.full(d.values.shape, np.nan, np.float32) for d in devices]
    longest = max(len(d.ts_ms) for d in devices)
    for lo in range(0, longest, chunk):
        live = [j for j, d in enumerate(devices) if lo < len(d.ts_ms)]
        parts = [(j, slice(lo, min(lo + chunk, len(devices[j].ts_ms)))) for j in live]
        ids = [devices[j].name for j, sl in parts for _ in range(sl.stop - sl.start)]
        res = op.process(ids, np.concatenate([devices[j].ts_ms[sl] for j, sl in parts]),
                         np.concatenate([devices[j].values[sl] for j, sl in parts]))
        pos = 0
        for j, sl in parts:
            n = sl.stop - sl.start
            scores[j][sl] = res.anomaly_score[pos:pos + n]
            alerts[j][sl] = res.is_alert[pos:pos + n]
            forecasts[j][sl] = res.forecast[pos:pos + n]
            pos += n
    return Streamed(scores, alerts, forecasts)


def forecast_mse(devices: Sequence[Device], forecasts: Sequence[np.ndarray] | None) -> float:
    """Mean squared error of the next-reading forecasts after commissioning, on normal readings (the reading
    and the one forecast both outside labelled anomalies: how well normal behaviour is predicted), each channel
    in units of its commissioning standard deviation (floored at 1e-3 of its level, for flat channels);
    ``None``: persistence (the next reading forecast as this one)."""
    errs = []
    for k, d in enumerate(devices):
        comm = d.values[:d.commissioning]
        scale = np.maximum(comm.std(axis=0), 1e-3 * (np.abs(comm.mean(axis=0)) + 1e-3))
        pred = d.values[d.commissioning:-1] if forecasts is None else forecasts[k][d.commissioning:-1]
        err = (pred - d.values[d.commissioning + 1:]) / scale
        keep = np.isfinite(err).all(axis=1)
        if d.normal is not None:
            keep &= d.normal[d.commissioning:-1] & d.normal[d.commissioning + 1:]
        errs.append(err[keep] ** 2)
    return float(np.concatenate(errs).mean())


def mse_line(mse: dict[str, float], rows: str) -> str:
    """The report's forecast-MSE line: ``rows`` says which readings were scored, and in which units.

    >>> mse_line({"persistence": 1.5, "cfc": 1.25}, "normal readings")
    'forecast MSE on normal readings: persistence 1.5000, cfc 1.2500'
    """
    return f"forecast MSE on {rows}: " + ", ".join(f"{k} {v:.4f}" for k, v in mse.items())


#: Each ablation: which model to serve (``trained``, ``persistence`` or ``gru``) and the operator settings.
ABLATIONS: dict[str, tuple[str, Callable[[OperatorSettings], OperatorSettings]]] = {
    "full": ("trained", lambda s: s),
    "rules_only": ("trained", lambda s: dataclasses.replace(s, model_triggers=False, level_rule=True, stuck_rule=True)),
    "model_only": ("trained", lambda s: dataclasses.replace(s, level_rule=False, stuck_rule=False)),
    "persistence": ("persistence", lambda s: s),
    "gru": ("gru", lambda s: s),
}


def _train_job(devices: Sequence[Device], kind: str, hidden_size: int, epochs: int, stats_alpha: float,
               device: str, seed: int, threads: int) -> Forecaster:
    torch.set_num_threads(threads)
    if kind == "persistence":
        torch.manual_seed(seed)
        return Forecaster(n_channels=devices[0].values.shape[1], hidden_size=hidden_size).eval()
    return train_forecaster(devices, kind=kind, hidden_size=hidden_size, epochs=epochs, stats_alpha=stats_alpha,
                            device=device, seed=seed)


def _stream_job(model: Forecaster, settings: OperatorSettings, devices: Sequence[Device], version: str,
                device: str, threads: int) -> Streamed:
    torch.set_num_threads(threads)
    op = LiquidOperator(model, settings, device=device, model_version=version)
    op.set_commissioning([d.name for d in devices], [d.commissioning for d in devices])
    return stream(op, devices)


def run_ablations(devices: Sequence[Device], base: OperatorSettings, *, cell: str, hidden_size: int, epochs: int,
                  device: str, names: Sequence[str] = tuple(ABLATIONS), seed: int = 0, workers: int | None = None,
                  ) -> tuple[dict[str, Streamed], dict[str, float]]:
    """Each named ablation's stream, and the forecast MSE of every model served (and of persistence).

    The trainings, then the streams, run in ``workers`` processes (default: one per CPU core, at most 4; one on
    a GPU), each with the calling process's torch thread count, so the figures do not depend on ``workers``.
    """
    threads = torch.get_num_threads()
    if workers is None:
        workers = 1 if device != "cpu" else max(1, min(4, os.cpu_count() or 1))
    kinds = {name: ABLATIONS[name][0] for name in names}
    model_kind = {k: (cell if k == "trained" else k) for k in set(kinds.values())}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) if workers > 1 else _Inline() as pool:
        trained = {k: pool.submit(_train_job, devices, mk, hidden_size, epochs, base.stats_alpha, device, seed,
                                  threads) for k, mk in sorted(model_kind.items())}
        models = {k: f.result() for k, f in trained.items()}
        futures = {name: pool.submit(_stream_job, models[kinds[name]], ABLATIONS[name][1](base), devices,
                                     f"{name}-{kinds[name]}", device, threads) for name in names}
        runs = {name: f.result() for name, f in futures.items()}
    mse: dict[str, float] = {"persistence": forecast_mse(devices, None)}
    for name in names:
        mse.setdefault(model_kind[kinds[name]], forecast_mse(devices, runs[name].forecast))
    return runs, mse


class _Inline:
    """A pool of one that runs each job when submitted (no process start on a GPU or a one-core box)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        done.set_result(fn(*args))
        return done
