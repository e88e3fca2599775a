"""The streaming detectors a user would pick instead of liquidstream, under the same protocol as ours.

Each detector gets per-stream readings (``values`` float32 [n, C]) and the length of the stream's training
part (assumed normal, labels never used), and returns one bool flag per reading *after* the training part,
computed one reading at a time with no look-ahead:

* :func:`hst_flags`: River's ``HalfSpaceTrees`` on min-max scaled readings.  The scaler's range and the
  trees' mass profile are learned on the training part only, then fixed (as the published SKAB baselines
  fit on their training part); a reading is flagged when its score exceeds the largest score the training
  part produced after its first window (the trees' first window has no reference mass yet).
* :func:`rolling_z_flags`: a rolling z-score per channel over the previous ``window`` readings; flagged
  when any channel's ``|z|`` exceeds the largest ``|z|`` seen on the training part (at least ``z_min``).
  It keeps adapting by design, which is what makes it cheap and also what makes it forget a long anomaly.

>>> rng = np.random.default_rng(0)
>>> v = rng.normal(size=(300, 2)).astype(np.float32)
>>> v[250:] += 20.0  # a level shift after the training part
>>> flags = rolling_z_flags(v, train_rows=200, window=50)
>>> flags.shape, bool(flags[50]), float(flags[:50].mean()) < 0.1  # flags the shift, rarely the noise
((100,), True, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: HalfSpaceTrees settings: River's defaults except the window, sized so the training part holds a few.
HST_TREES, HST_HEIGHT, HST_WINDOW = 25, 8, 100


def hst_flags(values: np.ndarray, train_rows: int, *, seed: int = 0, quantile: float = 1.0) -> np.ndarray:
    """HalfSpaceTrees flags for the readings after ``train_rows`` (fixed after the training part)."""
    from river import anomaly  # optional dependency (the ``eval`` extra)

    v = np.asarray(values, np.float64)
    lo, hi = v[:train_rows].min(axis=0), v[:train_rows].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    # Scaled with the training part's range and clipped to HST's [0, 1] domain: a reading beyond the range
    # lands in the outermost cells, where the training part put little mass.
    scaled = np.clip((v - lo) / span, 0.0, 1.0)
    names = [f"c{j}" for j in range(v.shape[1])]
    window = min(HST_WINDOW, train_rows)
    model: Any = anomaly.HalfSpaceTrees(n_trees=HST_TREES, height=HST_HEIGHT, window_size=window, seed=seed)  # untyped
    train_scores = []
    for row in scaled[:train_rows]:
        x = dict(zip(names, row.tolist(), strict=True))
        train_scores.append(model.score_one(x))
        model.learn_one(x)
    threshold = float(np.quantile(train_scores[window:] or train_scores, quantile))
    return np.array([model.score_one(dict(zip(names, row.tolist(), strict=True))) > threshold
                     for row in scaled[train_rows:]], bool)


def rolling_z_flags(values: np.ndarray, train_rows: int, *, window: int = 120, z_min: float = 3.0) -> np.ndarray:
    """Rolling z-score flags for the readings after ``train_rows``; threshold from the training part."""
    v = np.asarray(values, np.float64)
    n = len(v)
    csum = np.vstack([np.zeros((1, v.shape[1])), np.cumsum(v, axis=0)])
    csq = np.vstack([np.zeros((1, v.shape[1])), np.cumsum(v * v, axis=0)])
    z = np.zeros(n)
    for i in range(2, n):  # reading i against the readings before it (at most ``window``): no look-ahead
        lo = max(0, i - window)
        k = i - lo
        mean = (csum[i] - csum[lo]) / k
        var = np.maximum((csq[i] - csq[lo]) / k - mean * mean, 0.0)
        std = np.sqrt(var) + 1e-6 * (np.abs(mean) + 1.0)
        z[i] = float(np.max(np.abs(v[i] - mean) / std))
    threshold = max(z_min, float(z[min(window, train_rows - 1):train_rows].max(initial=0.0)))
    return z[train_rows:] > threshold
