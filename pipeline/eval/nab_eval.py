"""``liquidstream evaluate nab``: the operator's defaults on the Numenta Anomaly Benchmark, scored by the NAB rules.

Protocol (``../shared/data/README.md``): every file is one device streamed in time order with no look-ahead; its
probationary part (the first 15 %, at most 750 rows) is that device's commissioning data (the forecaster trains on
those parts, pooled over the corpus; the operator is told each device's length with
:meth:`~liquidstream.operators.operator.LiquidOperator.set_commissioning`), and it is never scored.  The detector's
output per row is the prediction record's ``anomaly_score``, except that a reading that comes while an alert opened
earlier is still open, or in the cooldown after it, scores 0: one incident is one detection, as the worker
publishes one alert per incident (this uses only the operator's own earlier outputs, never a later row).  The
scorer (:mod:`~liquidstream.pipeline.eval.nab_scoring`) then picks the best threshold per profile, as NAB does for
every detector.  The ablations of :mod:`~liquidstream.pipeline.eval.detection` run in the same command.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from liquidstream.operators import OperatorSettings
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.eval.detection import ABLATIONS, Device, Streamed, mse_line, run_ablations
from liquidstream.pipeline.eval.nab_scoring import NabFile, load_corpus, load_profiles, score_all_profiles
from liquidstream.pipeline.settings import Settings

__all__ = ["SCOREBOARD", "evaluate_nab", "format_nab", "nab_scores"]

#: The published scoreboard (NAB README, normalised): standard, reward low FP, reward low FN.
SCOREBOARD: tuple[tuple[str, float, float, float], ...] = (
    ("ARTime", 74.9, 65.1, 80.4), ("Numenta HTM", 70.1, 63.1, 74.3), ("CAD OSE", 69.9, 67.0, 73.2),
    ("earthgecko Skyline", 58.2, 46.2, 63.9), ("KNN CAD", 58.0, 43.4, 64.8), ("Relative Entropy", 54.6, 47.6, 58.8),
    ("Random Cut Forest", 51.7, 38.4, 59.7), ("Twitter ADVec", 47.1, 33.6, 53.5),
    ("Windowed Gaussian", 39.6, 20.9, 47.4), ("Bayesian Changepoint", 17.7, 3.2, 32.2), ("Random", 11.0, 1.2, 19.5),
    ("Null", 0.0, 0.0, 0.0),
)
PROFILE_KEYS = {"standard": "standard", "reward_low_FP_rate": "reward_low_fp", "reward_low_FN_rate": "reward_low_fn"}


def devices_of(files: list[NabFile]) -> list[Device]:
    """Each NAB file as a device whose probationary part is its commissioning part."""
    out = []
    for f in files:
        normal = np.ones(len(f.timestamps), bool)
        for lo, hi in f.windows:
            normal[lo:hi + 1] = False
        out.append(Device(f.name, f.timestamps, f.values.astype(np.float32).reshape(-1, 1), f.probation, normal))
    return out


def incident_scores(run: Streamed, cooldown: int) -> list[np.ndarray]:
    """``anomaly_score`` per row, 0 while an alert opened on an earlier reading is open or within ``cooldown``
    readings after it closed (causal: built from the flags of earlier readings only).

    >>> r = Streamed([np.array([.1, .9, .8, .2, .7, .6], np.float32)], [np.array([0, 1, 1, 0, 0, 0], bool)], [])
    >>> [round(v, 2) for v in incident_scores(r, cooldown=1)[0].tolist()]
    [0.1, 0.9, 0.0, 0.0, 0.0, 0.6]
    """
    out = []
    for score, alert in zip(run.anomaly_score, run.is_alert, strict=True):
        blocked = np.zeros(len(score), bool)
        blocked[1:] = alert[:-1]  # an alert was already open before this reading
        closes = np.flatnonzero(alert[:-1] & ~alert[1:]) + 1  # the readings on which an alert closed
        for c in closes:
            blocked[c:c + cooldown + 1] = True  # the closing reading, then ``cooldown`` more
        out.append(np.where(blocked, 0.0, np.nan_to_num(score, nan=0.0)).astype(np.float64))
    return out


def nab_scores(files: list[NabFile], run: Streamed, cooldown: int, data_dir: Path) -> dict[str, float]:
    scores = dict(zip((f.name for f in files), incident_scores(run, cooldown), strict=True))
    got = score_all_profiles(files, scores, load_profiles(data_dir))
    return {PROFILE_KEYS[k]: round(v, 2) for k, v in got.items()}


def evaluate_nab(settings: Settings, data_dir: Path, *, epochs: int, cell: str, hidden_size: int,
                 ablations: bool = True) -> dict[str, Any]:
    """Every ablation over the whole corpus; the last-line JSON fields are the defaults' (``full``)."""
    if not (data_dir / "labels" / "combined_windows.json").is_file():
        msg = f"--data-dir {data_dir}: not NAB's folder (no labels/combined_windows.json)"
        raise ConfigurationError(msg)
    files = load_corpus(data_dir)
    devices = devices_of(files)
    base: OperatorSettings = settings.operator
    names = tuple(ABLATIONS) if ablations else ("full",)
    t0 = time.perf_counter()
    runs, mse = run_ablations(devices, base, cell=cell, hidden_size=hidden_size, epochs=epochs,
                              device=settings.torch_device(), names=names)
    cooldown = base.cooldown_events
    table = {name: nab_scores(files, run, cooldown, data_dir) for name, run in runs.items()}
    full = table["full"]
    return {"files": len(files), "rows": int(sum(len(f.timestamps) for f in files)),
            "windows": int(sum(len(f.windows) for f in files)), "cell": cell, "hidden_size": hidden_size,
            "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1), "ablations": table,
            "forecast_mse": {k: round(v, 4) for k, v in mse.items()},
            "standard": full["standard"], "reward_low_fp": full["reward_low_fp"],
            "reward_low_fn": full["reward_low_fn"], "mse_model": round(mse[cell], 4),
            "mse_persistence": round(mse["persistence"], 4)}


def format_nab(report: dict[str, Any]) -> str:
    lines = [f"NAB: {report['files']} files, {report['rows']} rows, {report['windows']} windows; operator defaults, "
             f"{report['cell']} hidden {report['hidden_size']}, {report['epochs']} epochs, {report['seconds']} s",
             f"{'detector':34s} {'standard':>8s} {'low FP':>7s} {'low FN':>7s}  source"]
    for name, r in report["ablations"].items():
        lines.append(f"{'liquidstream ' + name:34s} {r['standard']:8.1f} {r['reward_low_fp']:7.1f} "
                     f"{r['reward_low_fn']:7.1f}  measured here")
    for name, std, fp, fn in SCOREBOARD:
        lines.append(f"{name:34s} {std:8.1f} {fp:7.1f} {fn:7.1f}  NAB scoreboard (published)")
    lines.append(mse_line(report["forecast_mse"], "readings outside the windows after probation (probation-std units)"))
    return "\n".join(lines)
