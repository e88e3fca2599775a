"""``liquidstream evaluate skab``: the operator's defaults and its peers on SKAB, one protocol, one run.

Detectors, all streaming one reading at a time with no look-ahead and no labels for fitting:

* **liquidstream**, with the operator defaults: every experiment file is one device whose first 400 rows (the
  protocol's training part) are its commissioning data, the only per-dataset input; the forecaster trains on
  those parts, pooled (:mod:`~liquidstream.pipeline.eval.detection`).  A test point is flagged when an alert is
  open on its device right after it.  The ablations (``rules_only``, ``model_only``, ``persistence``, ``gru``)
  run in the same command.
* peers from :mod:`liquidstream.pipeline.eval.peers`: River ``HalfSpaceTrees`` and a rolling z-score.

Every detector is reported on all files and on the even / odd halves of the sorted file list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from liquidstream.pipeline.eval.detection import ABLATIONS, Device, mse_line, run_ablations
from liquidstream.pipeline.eval.peers import hst_flags, rolling_z_flags
from liquidstream.pipeline.eval.skab import CHANNELS, LEADERBOARD, TRAIN_ROWS, Experiment, load_skab, point_scores
from liquidstream.pipeline.settings import Settings

__all__ = ["evaluate_skab", "format_table"]

Flags = Callable[[list[Experiment]], list[np.ndarray]]


def devices_of(exps: list[Experiment]) -> list[Device]:
    """Each experiment as a device whose training part is its commissioning part."""
    return [Device(e.name, e.ts_ms, e.values, TRAIN_ROWS, normal=~e.anomaly) for e in exps]


def peer_detectors() -> dict[str, Flags]:
    return {
        "River HalfSpaceTrees (q=0.99)": lambda exps: [hst_flags(e.values, TRAIN_ROWS, quantile=0.99) for e in exps],
        "River HalfSpaceTrees (q=0.95)": lambda exps: [hst_flags(e.values, TRAIN_ROWS, quantile=0.95) for e in exps],
        "rolling z-score (300 readings)": lambda exps: [rolling_z_flags(e.values, TRAIN_ROWS, window=300)
                                                        for e in exps],
    }


def _scores(truth: list[np.ndarray], pred: list[np.ndarray], seconds: float) -> dict[str, Any]:
    return point_scores(truth, pred).as_dict() | {
        "even_files": point_scores(truth[0::2], pred[0::2]).as_dict(),
        "odd_files": point_scores(truth[1::2], pred[1::2]).as_dict(), "seconds": round(seconds, 1)}


def evaluate_skab(settings: Settings, data_dir: Path, *, epochs: int = 20, cell: str = "cfc", hidden_size: int = 32,
                  peers: bool = True, ablations: bool = True) -> dict[str, Any]:
    """Every detector under the leaderboard protocol; the last-line JSON fields are the defaults' (``full``)."""
    exps = load_skab(data_dir)
    truth = [e.anomaly[TRAIN_ROWS:] for e in exps]
    t0 = time.perf_counter()
    names = tuple(ABLATIONS) if ablations else ("full",)
    runs, mse = run_ablations(devices_of(exps), settings.operator, cell=cell, hidden_size=hidden_size,
                              epochs=epochs, device=settings.torch_device(), names=names)
    seconds = (time.perf_counter() - t0) / len(runs)
    table = {name: _scores(truth, [a[TRAIN_ROWS:] for a in run.is_alert], seconds) for name, run in runs.items()}
    results = {f"liquidstream {name}": r for name, r in table.items()}
    if peers:
        for name, det in peer_detectors().items():
            t1 = time.perf_counter()
            pred = det(exps)
            results[name] = _scores(truth, pred, time.perf_counter() - t1)
    full = table["full"]
    return {"files": len(exps), "test_points": full["points"], "channels": list(CHANNELS), "epochs": epochs,
            "cell": cell, "hidden_size": hidden_size, "results": results,
            "ablations": {k: {m: v[m] for m in ("f1", "far", "mar")} for k, v in table.items()},
            "forecast_mse": {k: round(v, 4) for k, v in mse.items()},
            "mse_model": round(mse[cell], 4), "mse_persistence": round(mse["persistence"], 4),
            "f1": full["f1"], "far": full["far"], "mar": full["mar"]}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"SKAB: {report['files']} experiment files, {report['test_points']} test points (point-wise; "
             f"operator defaults, commissioning = first {TRAIN_ROWS} rows)",
             f"{'detector':34s} {'F1':>5s} {'FAR %':>6s} {'MAR %':>6s}  {'even F1':>7s} {'odd F1':>6s}  source"]
    for name, r in report["results"].items():
        lines.append(f"{name:34s} {r['f1']:5.2f} {r['far']:6.2f} {r['mar']:6.2f}  {r['even_files']['f1']:7.2f} "
                     f"{r['odd_files']['f1']:6.2f}  measured here, {r['seconds']:.0f} s")
    for name, f1, far, mar in LEADERBOARD:
        lines.append(f"{name:34s} {f1:5.2f} {far:6.2f} {mar:6.2f}  {'':7s} {'':6s}  SKAB leaderboard (published)")
    lines.append(mse_line(report["forecast_mse"], "normal readings after commissioning (commissioning-std units)"))
    return "\n".join(lines)
