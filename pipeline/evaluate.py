"""``liquidstream evaluate skab``: the operator and its peers on SKAB, one protocol, one run.

Detectors, all streaming one reading at a time with no look-ahead and no labels for training:

* **liquidstream**: a forecaster trained on the pooled training parts; each experiment streams through
  :class:`~operators.operator.LiquidOperator` as one device (training part first, to warm its state);
  a test point is flagged when an alert is open on the device after it.
* **River HalfSpaceTrees** (min-max scaled, learned on the training part; threshold = the largest score
  seen on the training part) and a **rolling z-score** (per channel, 60-reading window; flag when any
  |z| > 4).  Both are the streaming detectors a user would pick instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from operators import Forecaster, LiquidOperator
from operators.training import Sequences, Trainer
from pipeline.settings import Settings
from pipeline.skab import CHANNELS, LEADERBOARD, TRAIN_ROWS, Experiment, PointScores, load_skab, point_scores

Detector = Callable[[list[Experiment]], list[np.ndarray]]


def liquid_detector(settings: Settings, *, epochs: int, cell: str, hidden_size: int, seed: int = 0) -> Detector:
    def run(exps: list[Experiment]) -> list[np.ndarray]:
        torch.manual_seed(seed)
        ids = [e.name for e in exps for _ in range(TRAIN_ROWS)]
        seqs = Sequences.from_columns(ids, np.concatenate([e.ts_ms[:TRAIN_ROWS] for e in exps]),
                                      np.concatenate([e.values[:TRAIN_ROWS] for e in exps]))
        options: dict[str, object] = {"backbone_units": hidden_size} if cell == "cfc" else {}
        model = Forecaster(n_channels=len(CHANNELS), hidden_size=hidden_size, cell=cell, cell_options=options)
        Trainer(model, window=32, lr=3e-3, stats_alpha=settings.operator.stats_alpha, seed=seed).fit(seqs, epochs)
        op = LiquidOperator(model.eval(), settings.operator, model_version="skab")
        out = []
        for e in exps:  # devices are independent: streaming them one after another is the same as interleaved
            flags = np.zeros(len(e.ts_ms), bool)
            for i in range(len(e.ts_ms)):  # one reading at a time, exactly as a live stream would deliver it
                res = op.process([e.name], e.ts_ms[i:i + 1], e.values[i:i + 1])
                flags[i] = bool(res.is_alert[0])
            out.append(flags[TRAIN_ROWS:])
        return out
    return run


def hst_detector(exps: list[Experiment]) -> list[np.ndarray]:
    from river import anomaly, compose, preprocessing

    out = []
    for e in exps:
        model = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=0, window_size=100))
        train_scores = []
        for x in e.values[:TRAIN_ROWS]:
            row = dict(zip(CHANNELS, map(float, x), strict=True))
            train_scores.append(model.score_one(row))
            model.learn_one(row)
        threshold = max(train_scores[100:])  # after the first window the scores mean something
        flags = []
        for x in e.values[TRAIN_ROWS:]:
            row = dict(zip(CHANNELS, map(float, x), strict=True))
            flags.append(model.score_one(row) > threshold)
            model.learn_one(row)
        out.append(np.array(flags, bool))
    return out


def rolling_z_detector(exps: list[Experiment], window: int = 60, z_max: float = 4.0) -> list[np.ndarray]:
    out = []
    for e in exps:
        v = e.values.astype(np.float64)
        flags = np.zeros(len(v), bool)
        for i in range(window, len(v)):
            past = v[i - window:i]
            std = past.std(axis=0) + 1e-9
            flags[i] = bool((np.abs(v[i] - past.mean(axis=0)) / std > z_max).any())
        out.append(flags[TRAIN_ROWS:])
    return out


def evaluate_skab(settings: Settings, data_dir: Path, *, epochs: int = 30, cell: str = "cfc", hidden_size: int = 32,
                  peers: bool = True) -> dict[str, Any]:
    exps = load_skab(data_dir)
    truth = [e.anomaly[TRAIN_ROWS:] for e in exps]
    detectors: dict[str, Detector] = {
        f"liquidstream ({cell}, streaming)": liquid_detector(settings, epochs=epochs, cell=cell,
                                                             hidden_size=hidden_size)}
    if peers:
        detectors["River HalfSpaceTrees (streaming)"] = hst_detector
        detectors["rolling z-score (streaming)"] = rolling_z_detector
    results: dict[str, dict[str, float]] = {}
    for name, det in detectors.items():
        t0 = time.perf_counter()
        scores: PointScores = point_scores(truth, det(exps))
        results[name] = scores.as_dict() | {"seconds": round(time.perf_counter() - t0, 1)}
    ours = next(iter(results.values()))
    return {"files": len(exps), "test_points": ours["points"], "results": results,
            "f1": ours["f1"], "far": ours["far"], "mar": ours["mar"]}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"SKAB: {report['files']} experiment files, {report['test_points']} test points (point-wise)",
             f"{'detector':42s} {'F1':>6s} {'FAR %':>7s} {'MAR %':>7s}  source"]
    for name, r in report["results"].items():
        lines.append(f"{name:42s} {r['f1']:6.2f} {r['far']:7.2f} {r['mar']:7.2f}  measured here")
    for name, f1, far, mar in LEADERBOARD:
        lines.append(f"{name:42s} {f1:6.2f} {far:7.2f} {mar:7.2f}  SKAB leaderboard (published)")
    return "\n".join(lines)
