"""Numenta Anomaly Benchmark (NAB) scorer written from the published rules.

Rules implemented (NAB paper / whitepaper, as summarised in the shared data README):

* Each file has one anomaly score per row.  The first ``min(floor(0.15 * rows), 750)`` rows are the
  probationary period; rows there are never scored (neither detections nor false positives).
* A window ``[start, end]`` (timestamps, both inclusive) covers the rows whose timestamps fall inside it.
* A threshold turns scores into detections (``score >= threshold``).  Inside a window only the first
  detection counts and earns ``tpWeight * S(x) / S(-1)`` with ``x = -(right - i + 1) / width`` and
  ``S(x) = 2 / (1 + exp(5x)) - 1``; later detections in the same window are ignored.  A window without a
  detection costs ``-fnWeight``.
* A detection outside every window costs ``fpWeight * S(y)`` (negative) with ``y = (i - right) / (width - 1)``
  measured from the end of the preceding window; ``S = -1`` when ``y > 3`` or when no window precedes it.
* Raw score = sum over all windows and false positives of all files.  Normalised score is
  ``100 * (raw - null) / (perfect - null)`` where null misses every window (``-fnWeight`` each) and perfect
  detects every window at its first row (``tpWeight`` each).
* The benchmark picks, per detector and profile, the single threshold among the distinct score values
  that maximises the corpus score.  :func:`optimise` does this exactly with one sorted cumulative sweep.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750  # 0.15 * 5000


@dataclass(frozen=True)
class Costs:
    """One NAB cost profile."""

    tp: float
    fn: float
    fp: float


@dataclass(frozen=True)
class NabFile:
    """One corpus file: rows, scored windows as inclusive row ranges, and probationary length."""

    name: str
    timestamps: IntArray
    values: FloatArray
    windows: list[tuple[int, int]]
    probation: int


def probation_rows(n_rows: int) -> int:
    """Length of the probationary period of a file with ``n_rows`` rows."""
    return min(math.floor(PROBATION_FRACTION * n_rows), PROBATION_MAX_ROWS)


def _parse_times(stamps: list[str]) -> IntArray:
    return np.array([s.strip().replace(" ", "T") for s in stamps], dtype="datetime64[ms]").astype(np.int64)


def _read_two_columns(path: Path) -> tuple[list[str], list[str]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return [r[0] for r in rows if r], [r[1] for r in rows if r]


def load_profiles(data_dir: Path) -> dict[str, Costs]:
    """Read ``config/profiles.json``."""
    raw = json.loads((data_dir / "config" / "profiles.json").read_text())
    return {
        name: Costs(float(p["CostMatrix"]["tpWeight"]), float(p["CostMatrix"]["fnWeight"]),
                    float(p["CostMatrix"]["fpWeight"]))
        for name, p in raw.items()
    }


# Mirror of the published config/profiles.json (use load_profiles to read a data dir's own copy).
PROFILES: dict[str, Costs] = {
    "standard": Costs(tp=1.0, fn=1.0, fp=0.11),
    "reward_low_FP_rate": Costs(tp=1.0, fn=1.0, fp=0.22),
    "reward_low_FN_rate": Costs(tp=1.0, fn=2.0, fp=0.11),
}


def load_corpus(data_dir: Path) -> list[NabFile]:
    """Load every file listed in ``labels/combined_windows.json``, sorted by name."""
    windows_json: dict[str, list[list[str]]] = json.loads(
        (data_dir / "labels" / "combined_windows.json").read_text())
    files = []
    for name in sorted(windows_json):
        stamps, values = _read_two_columns(data_dir / "data" / name)
        ts = _parse_times(stamps)
        bounds = _parse_times([t for pair in windows_json[name] for t in pair]).reshape(-1, 2)
        windows = []
        for start, end in bounds:
            lo = int(np.searchsorted(ts, start, side="left"))
            hi = int(np.searchsorted(ts, end, side="right")) - 1
            if hi >= lo:
                windows.append((lo, hi))
        files.append(NabFile(name, ts, np.array(values, dtype=np.float64), windows, probation_rows(len(ts))))
    return files


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return out


_S_EARLIEST = float(_sigmoid(np.array([-1.0]))[0])


def _row_weights(f: NabFile, costs: Costs) -> tuple[FloatArray, IntArray]:
    """Per-row value of a detection: TP reward inside windows, FP cost outside (0 in probation).

    Also returns each row's window id (-1 outside windows)."""
    n = len(f.timestamps)
    idx = np.arange(n, dtype=np.float64)
    weight = np.empty(n, dtype=np.float64)
    window_id = np.full(n, -1, dtype=np.int64)
    prev_right, prev_width = -1, 0
    cursor = 0
    for k, (left, right) in enumerate([*f.windows, (n, n)]):
        gap = slice(cursor, left)
        if prev_right < 0:
            weight[gap] = -costs.fp
        else:
            y = (idx[gap] - prev_right) / max(prev_width - 1, 1)
            weight[gap] = np.where(y > 3.0, -1.0, _sigmoid(y)) * costs.fp
        if k == len(f.windows):
            break
        width = right - left + 1
        x = -(right - idx[left:right + 1] + 1) / width
        weight[left:right + 1] = _sigmoid(x) * costs.tp / _S_EARLIEST
        window_id[left:right + 1] = k
        prev_right, prev_width, cursor = right, width, right + 1
    weight[: f.probation] = 0.0
    return weight, window_id


def _file_score(f: NabFile, detected: BoolArray, costs: Costs) -> float:
    weight, window_id = _row_weights(f, costs)
    live = detected.copy()
    live[: f.probation] = False
    total = float(weight[live & (window_id < 0)].sum())
    for left, right in f.windows:
        hits = np.flatnonzero(live[left:right + 1])
        total += float(weight[left + hits[0]]) if hits.size else -costs.fn
    return total


def score_detections(files: list[NabFile], detections: dict[str, BoolArray], costs: Costs) -> float:
    """Raw corpus score of boolean per-row detections."""
    return sum(_file_score(f, np.asarray(detections[f.name], dtype=bool), costs) for f in files)


def normalised(files: list[NabFile], raw: float, costs: Costs) -> float:
    """Scale a raw score so that the null detector gives 0 and the perfect detector 100."""
    n_windows = sum(len(f.windows) for f in files)
    null, perfect = -costs.fn * n_windows, costs.tp * n_windows
    return 100.0 * (raw - null) / (perfect - null)


def _events(f: NabFile, scores: FloatArray, costs: Costs) -> tuple[FloatArray, FloatArray]:
    """Threshold events (value, delta): the score gains ``delta`` once the threshold falls to ``value``."""
    weight, window_id = _row_weights(f, costs)
    scored = np.arange(len(scores)) >= f.probation
    fp_rows = scored & (window_id < 0)
    values, deltas = [scores[fp_rows]], [weight[fp_rows]]
    for left, right in f.windows:
        lo = max(left, f.probation)
        if lo > right:
            continue
        s = scores[lo:right + 1]
        prefix_max = np.maximum.accumulate(s)
        records = np.flatnonzero(np.concatenate(([True], prefix_max[1:] > prefix_max[:-1])))
        gains = weight[lo + records]
        # Threshold at records[j]'s value moves the first detection from the next record (or a miss) to it.
        previous = np.append(gains[1:], -costs.fn)
        values.append(s[records])
        deltas.append(gains - previous)
    return np.concatenate(values), np.concatenate(deltas)


def optimise(files: list[NabFile], scores: dict[str, FloatArray], costs: Costs) -> tuple[float, float]:
    """Exact best threshold (``score >= threshold`` detects) over the distinct score values, and its normalised score.

    Every detection's value is known per row, so the corpus score as a function of the threshold is a step
    function: an FP row adds its (negative) cost once the threshold drops to its score; a window's first
    detection only moves when the threshold drops below a new running maximum of the window's scores.
    Sorting all these events once and taking a cumulative sum gives the score at every threshold.
    Ties go to the lowest threshold."""
    parts = [_events(f, np.asarray(scores[f.name], dtype=np.float64), costs) for f in files]
    values = np.concatenate([p[0] for p in parts])
    deltas = np.concatenate([p[1] for p in parts])
    base = -costs.fn * sum(len(f.windows) for f in files)
    # Distinct score values, plus +inf ("detect nothing") which wins only if every threshold scores below null.
    candidates = np.append(np.unique(np.concatenate([np.asarray(scores[f.name]) for f in files])), np.inf)
    order = np.argsort(-values, kind="stable")
    cum = np.concatenate(([0.0], np.cumsum(deltas[order])))
    sorted_desc = values[order]
    # Score at threshold t = base + sum of deltas with value >= t.
    n_ge = np.searchsorted(-sorted_desc, -candidates, side="right")
    totals = base + cum[n_ge]
    best = int(np.argmax(totals))
    return float(candidates[best]), normalised(files, float(totals[best]), costs)


def load_detector_scores(results_dir: Path, detector: str, files: list[NabFile]) -> dict[str, FloatArray]:
    """Read ``<results_dir>/<category>/<detector>_<file>.csv`` (timestamp, anomaly_score) for every file."""
    out: dict[str, FloatArray] = {}
    for f in files:
        category, base = f.name.split("/")
        stamps, values = _read_two_columns(results_dir / category / f"{detector}_{base}")
        ts = _parse_times(stamps)
        if len(ts) != len(f.timestamps) or not np.array_equal(ts, f.timestamps):
            msg = f"{detector} output for {f.name} does not match the data rows"
            raise ValueError(msg)
        out[f.name] = np.array(values, dtype=np.float64)
    return out


def score_all_profiles(files: list[NabFile], scores: dict[str, FloatArray],
                       profiles: dict[str, Costs] | None = None) -> dict[str, float]:
    """Optimised normalised score for each profile."""
    return {name: optimise(files, scores, costs)[1] for name, costs in (profiles or PROFILES).items()}
