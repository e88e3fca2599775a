"""Peers on irregular streams: the operator next to River's detectors on simulated incidents.

WaterFlow has no per-reading labels, so the detector comparison runs on the simulator (irregular by
construction, thinned further by random drops, incidents injected with ground truth: spikes, level
shifts, frequency changes, stuck sensors).  Same protocol as SKAB: each device's readings in its first
``prefix_s`` seconds (incident-free by construction) are its training part, labels are never used for
fitting, every detector runs one reading at a time, and point-wise F1 / FAR / MAR are computed over the
readings after the training parts.  The operator runs with the process's operator settings (the demo's
defaults unless ``LIQUIDSTREAM_OPERATOR__*`` says otherwise), fed in stream order, ``batch`` readings a call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from liquidstream.operators import Forecaster, LiquidOperator
from liquidstream.operators.training import Sequences, Trainer
from liquidstream.pipeline.eval.irregular.data import simulated
from liquidstream.pipeline.eval.peers import hst_flags, rolling_z_flags
from liquidstream.pipeline.eval.skab import point_scores
from liquidstream.pipeline.offline.simulator import Incident
from liquidstream.pipeline.settings import Settings


def truth_flags(device_ids: np.ndarray, ts_ms: np.ndarray, incidents: tuple[Incident, ...]) -> np.ndarray:
    """bool [N]: the reading lies inside an incident of its device (start_ms <= ts <= end_ms).

    >>> inc = (Incident("a", "level_shift", 2000, 3000, (0,)),)
    >>> truth_flags(np.array(["a", "b", "a", "a"]), np.array([2000, 2500, 3000, 3001]), inc).tolist()
    [True, False, True, False]
    """
    out = np.zeros(len(ts_ms), bool)
    for inc in incidents:
        out |= (device_ids == inc.device_id) & (ts_ms >= inc.start_ms) & (ts_ms <= inc.end_ms)
    return out


def evaluate_peers(settings: Settings, *, epochs: int, hidden_size: int, devices: int = 24, duration_s: float = 1800.0,
                   prefix_s: float = 600.0, anomaly_rate: float = 4.0, seed: int = 11, batch: int = 500,
                   ) -> dict[str, Any]:
    (ids_l, ts, values), incs = simulated(seed=seed, devices=devices, duration_s=duration_s,
                                          anomaly_rate=anomaly_rate, normal_prefix_s=prefix_s)
    ids = np.array(ids_l, dtype=object)
    truth = truth_flags(ids, ts, incs)
    start = int(ts.min())
    train = ts < start + int(prefix_s * 1000)
    results: dict[str, dict[str, Any]] = {}
    # liquidstream: train on the training parts, stream everything in stream order
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    device = settings.torch_device()
    model = Forecaster(n_channels=values.shape[1], hidden_size=hidden_size, cell="cfc",
                       cell_options={"backbone_units": hidden_size})
    Trainer(model, window=32, lr=3e-3, stats_alpha=settings.operator.stats_alpha, seed=seed, device=device).fit(
        Sequences.from_columns([str(d) for d in ids[train]], ts[train], values[train]), epochs)
    op = LiquidOperator(model.eval(), settings.operator, device=device, model_version="irregular-peers")
    alert = np.zeros(len(ts), bool)
    for lo in range(0, len(ts), batch):
        res = op.process([str(d) for d in ids[lo:lo + batch]], ts[lo:lo + batch], values[lo:lo + batch])
        alert[lo:lo + batch] = res.is_alert
    results["liquidstream (cfc, operator defaults)"] = _scores(truth, alert, train, t0)
    # peers: per device, training part first
    peers: list[tuple[str, Callable[[np.ndarray, int], np.ndarray]]] = [
        ("River HalfSpaceTrees (q=0.99)", lambda v, n: hst_flags(v, n, quantile=0.99)),
        ("River HalfSpaceTrees (q=0.95)", lambda v, n: hst_flags(v, n, quantile=0.95)),
        ("rolling z-score (300 readings)", lambda v, n: rolling_z_flags(v, n, window=300))]
    for name, fn in peers:
        t0 = time.perf_counter()
        flags = np.zeros(len(ts), bool)
        for dev in np.unique(ids):
            rows = np.flatnonzero(ids == dev)  # already in event-time order
            n_train = int(train[rows].sum())
            flags[rows[n_train:]] = fn(values[rows], n_train)
        results[name] = _scores(truth, flags, train, t0)
    return {"devices": devices, "duration_s": duration_s, "prefix_s": prefix_s, "incidents": len(incs),
            "test_points": int((~train).sum()), "anomalous_points": int(truth[~train].sum()), "results": results}


def _scores(truth: np.ndarray, flags: np.ndarray, train: np.ndarray, t0: float) -> dict[str, Any]:
    return point_scores([truth[~train]], [flags[~train]]).as_dict() | {
        "seconds": round(time.perf_counter() - t0, 1)}


def format_peers(report: dict[str, Any]) -> str:
    lines = [f"Peers on simulated irregular streams: {report['devices']} devices x {report['duration_s']:.0f} s, "
             f"{report['incidents']} incidents, {report['test_points']} test points "
             f"({report['anomalous_points']} anomalous), point-wise",
             f"{'detector':40s} {'F1':>5s} {'FAR %':>6s} {'MAR %':>6s}"]
    for name, r in report["results"].items():
        lines.append(f"{name:40s} {r['f1']:5.2f} {r['far']:6.2f} {r['mar']:6.2f}")
    return "\n".join(lines)
