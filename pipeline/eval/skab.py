"""SKAB (Skoltech Anomaly Benchmark) under its leaderboard protocol, streamed through the operator.

Protocol (the published leaderboard's): in each experiment file the first 400 rows are the training part
(assumed normal, labels unused), the rest is the test part; point-wise F1, FAR and MAR over the test parts of
all files together.  Each file is one device; event times come from its ``datetime`` column (about 1 Hz
with skipped seconds, so the gaps are real).  A reading's prediction is whether an alert is open on its
device right after it: the streaming decision, with no look-ahead.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from liquidstream.pipeline.errors import ConfigurationError

TRAIN_ROWS = 400
CHANNELS = ("Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
            "Voltage", "Volume Flow RateRMS")
#: The leaderboard from the SKAB README (outlier detection problem, test parts only): F1, FAR %, MAR %.
LEADERBOARD: tuple[tuple[str, float, float, float], ...] = (
    ("Conv-AE", 0.78, 13.55, 28.02), ("MSET", 0.78, 39.73, 14.13), ("T-squared+Q (PCA-based)", 0.76, 26.62, 24.92),
    ("LSTM-AE", 0.74, 29.96, 25.92), ("T-squared", 0.66, 19.21, 42.6), ("LSTM-VAE", 0.56, 9.13, 55.03),
    ("Vanilla LSTM", 0.54, 12.54, 59.53), ("Vanilla AE", 0.39, 2.59, 75.15), ("MSCRED", 0.36, 49.94, 69.88),
    ("Isolation forest", 0.29, 2.56, 82.89),
)


@dataclass(frozen=True)
class Experiment:
    name: str  # e.g. "valve1/3"
    ts_ms: np.ndarray  # int64 [n], epoch ms
    values: np.ndarray  # float32 [n, 8]
    anomaly: np.ndarray  # bool [n]


def load_skab(data_dir: Path) -> list[Experiment]:
    """Every labelled experiment file under ``data_dir`` (files without an ``anomaly`` column are skipped)."""
    files = sorted(p for p in data_dir.rglob("*.csv"))
    out = []
    for path in files:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
        if not rows or "anomaly" not in rows[0]:
            continue
        try:
            ts = np.array([datetime.strptime(r["datetime"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
                           for r in rows]) * 1000.0  # s -> ms
            values = np.array([[float(r[c]) for c in CHANNELS] for r in rows], dtype=np.float32)
            labels = np.array([float(r["anomaly"]) > 0.5 for r in rows])
        except (KeyError, ValueError) as ex:
            msg = f"{path}: not a SKAB experiment file: {ex}"
            raise ConfigurationError(msg) from ex
        out.append(Experiment(str(path.relative_to(data_dir).with_suffix("")), ts.astype(np.int64), values, labels))
    if not out:
        msg = f"no labelled SKAB experiment files under {data_dir}"
        raise ConfigurationError(msg)
    return out


@dataclass(frozen=True)
class PointScores:
    f1: float
    far: float  # false alarm rate, % of normal test points flagged
    mar: float  # missed alarm rate, % of anomalous test points not flagged
    points: int

    def as_dict(self) -> dict[str, float]:
        return {"f1": round(self.f1, 4), "far": round(self.far, 2), "mar": round(self.mar, 2), "points": self.points}


def point_scores(truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray]) -> PointScores:
    """Point-wise F1 / FAR / MAR over the concatenated test parts.

    >>> point_scores([np.array([0, 1, 1, 0], bool)], [np.array([0, 1, 0, 1], bool)])
    PointScores(f1=0.5, far=50.0, mar=50.0, points=4)
    """
    t = np.concatenate(truth).astype(bool)
    p = np.concatenate(predicted).astype(bool)
    tp, fp = int((t & p).sum()), int((~t & p).sum())
    fn, tn = int((t & ~p).sum()), int((~t & ~p).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    far = 100.0 * fp / (fp + tn) if fp + tn else 0.0
    mar = 100.0 * fn / (fn + tp) if fn + tp else 0.0
    return PointScores(f1, far, mar, len(t))
