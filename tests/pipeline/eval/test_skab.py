"""SKAB evaluation code on a tiny fixture in SKAB's own format (the real data stays in ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from liquidstream.pipeline.eval.skab import CHANNELS, TRAIN_ROWS, load_skab, point_scores
from liquidstream.pipeline.eval.skab_eval import evaluate_skab, format_table
from liquidstream.pipeline.settings import Settings


def _write_experiment(path: Path, rows: int, anomaly: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    lines = [";".join(["datetime", *CHANNELS, "anomaly", "changepoint"])]
    for i in t:
        base = 1.0 + 0.1 * np.sin(2 * np.pi * i / 30.0) + 0.01 * rng.normal(size=len(CHANNELS))
        bad = anomaly[0] <= i < anomaly[1]
        values = base + (2.0 if bad else 0.0)  # a collective level shift, like a closed valve
        stamp = f"2020-03-09 10:{(14 + (i + i // 7) // 60) % 60:02d}:{(i + i // 7) % 60:02d}"  # skipped seconds
        lines.append(";".join([stamp, *(f"{v:.5f}" for v in values), "1.0" if bad else "0.0", "0.0"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_point_scores_counts() -> None:
    s = point_scores([np.array([1, 1, 0, 0, 0], bool)], [np.array([1, 0, 1, 0, 0], bool)])
    assert (s.f1, round(s.far, 2), s.mar, s.points) == (0.5, 33.33, 50.0, 5)


def test_load_and_evaluate_tiny_fixture(tmp_path: Path) -> None:
    for k in range(2):
        _write_experiment(tmp_path / "valve1" / f"{k}.csv", rows=TRAIN_ROWS + 150, anomaly=(460, 520), seed=k)
    (tmp_path / "anomaly-free").mkdir()
    (tmp_path / "anomaly-free" / "free.csv").write_text("datetime;" + ";".join(CHANNELS) + "\n")
    exps = load_skab(tmp_path)
    assert [e.name for e in exps] == ["valve1/0", "valve1/1"]  # the unlabelled file is skipped
    assert exps[0].values.shape == (TRAIN_ROWS + 150, len(CHANNELS))
    gaps = np.diff(exps[0].ts_ms)
    assert set(np.unique(gaps).tolist()) == {1000, 2000}  # irregular, in ms
    report = evaluate_skab(Settings(), tmp_path, epochs=1, hidden_size=8, peers=True)
    assert report["test_points"] == 2 * 150
    assert set(report["results"]) >= {"River HalfSpaceTrees (q=0.99)", "rolling z-score (300 readings)"}
    # a 2.0 shift on 0.01 noise is impossible to miss: the operator must flag most of it
    assert report["mar"] < 50.0 and report["f1"] > 0.5
    assert "Conv-AE" in format_table(report)
