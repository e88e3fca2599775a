"""Irregularly sampled streams for the irregular-sampling study, from real recordings and the simulator.

* :func:`water_flow`: River's ``WaterFlow`` recording (water flow through a pipeline branch, l/s, hourly,
  March-May 2022, donated by Tecnojest s.r.l.), read from the CSV that ships *inside* the river wheel, so
  nothing is downloaded.  Time is rescaled so that the nominal period (1 hour) is 1 s: a gap-blind model fed
  ``dt = 1`` then sees exactly the nominal period, and the cells' time constants start in a sensible range.
* :func:`co2`: the Mauna Loa weekly atmospheric CO2 record (ppm, March 1958 - December 2001), read from
  the CSV that ships *inside* the statsmodels wheel (located without importing statsmodels, which would pull
  in pandas).  A real sensor recording with smooth, fast dynamics (a 6 ppm annual cycle on a trend) and its
  own missing weeks, which stay real gaps.  1 week is rescaled to 1 s.  :func:`elnino`: statsmodels'
  monthly sea-surface temperature (1950-2010), 1 month rescaled to 1 s.
* :func:`make_irregular`: thins a regular series into one irregular stream: *dense* runs keep every reading
  (bursts) and *sparse* runs keep one reading in 2-8 (dropouts).  Every kept reading is a real one at its
  real time; nothing is interpolated.
* :func:`simulated`: the project's simulator (irregular by construction: jitter, 50-200 ms bursts, 20-300 s
  dropouts), further thinned by random drops.

Streams come back as columns ``(device_ids, ts_ms, values)`` ready for
:meth:`liquidstream.operators.training.Sequences.from_columns`.

>>> ts, v = np.arange(100) * 1000, np.arange(100, dtype=np.float32)[:, None]
>>> ids, t2, v2 = make_irregular("d", ts, v, np.random.default_rng(0))
>>> 0 < len(t2) < 100 and bool((np.diff(t2) >= 1000).all()) and set(np.diff(t2).tolist()) != {1000}
True
"""

from __future__ import annotations

import csv
import importlib.util
from datetime import datetime
from pathlib import Path

import numpy as np

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.offline.simulator import Incident, simulate

Columns = tuple[list[str], np.ndarray, np.ndarray]  # device ids [N], ts_ms int64 [N], values float32 [N, C]


def water_flow_path() -> Path:
    """The WaterFlow CSV inside the installed river package."""
    try:
        import river.datasets
    except ImportError as ex:
        msg = "the irregular-sampling study needs river (pip install 'liquidstream[eval]')"
        raise ConfigurationError(msg) from ex
    path = Path(river.datasets.__file__).parent / "water-flow.csv"
    if not path.is_file():
        msg = f"river's WaterFlow recording is missing at {path}"
        raise ConfigurationError(msg)
    return path


def water_flow() -> tuple[np.ndarray, np.ndarray]:
    """(ts_ms int64 [N] with 1 hour rescaled to 1 s, flow float32 [N, 1] in l/s) of the whole recording."""
    with water_flow_path().open(newline="") as f:
        rows = list(csv.DictReader(f))
    hours = np.array([datetime.fromisoformat(r["Time"]).timestamp() for r in rows]) / 3600.0
    ts = np.round((hours - hours[0]) * 1000.0).astype(np.int64)  # 1 hour -> 1000 "ms" (1 s)
    return ts, np.array([[float(r["Water flow [l/s]"])] for r in rows], np.float32)


def statsmodels_csv(name: str) -> Path:
    """``statsmodels/datasets/<name>/<name>.csv`` of the installed package (statsmodels is not imported)."""
    spec = importlib.util.find_spec("statsmodels")  # a top-level name: located, not executed
    if spec is None or not spec.submodule_search_locations:
        msg = f"the irregular-sampling study's {name} stream needs statsmodels (pip install 'liquidstream[eval]')"
        raise ConfigurationError(msg)
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / name / f"{name}.csv"
    if not path.is_file():
        msg = f"statsmodels' {name} recording is missing at {path}"
        raise ConfigurationError(msg)
    return path


def co2_path() -> Path:
    """The Mauna Loa CO2 CSV inside the installed statsmodels package."""
    return statsmodels_csv("co2")


def elnino(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ts_ms int64 [N] with 1 month rescaled to 1 s, sea-surface temperature float32 [N, 1] in deg C) of
    statsmodels' El Nino recording (monthly, 1950-2010), one row a year of twelve months in the CSV."""
    with (path or statsmodels_csv("elnino")).open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    temps = [float(x) for r in rows for x in r[1:13]]
    return np.arange(len(temps), dtype=np.int64) * 1000, np.array(temps, np.float32)[:, None]


def co2(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ts_ms int64 [N] with 1 week rescaled to 1 s, CO2 float32 [N, 1] in ppm) of the weekly readings that
    exist: weeks with an empty value (the station's own missing weeks) are dropped, so they are real gaps."""
    with (path or co2_path()).open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["co2"].strip()]
    days = np.array([datetime.strptime(r["date"], "%Y%m%d").toordinal() for r in rows], np.float64)
    ts = np.round((days - days[0]) / 7.0 * 1000.0).astype(np.int64)  # 1 week -> 1000 "ms" (1 s)
    return ts, np.array([[float(r["co2"])] for r in rows], np.float32)


def make_irregular(device: str, ts_ms: np.ndarray, values: np.ndarray, rng: np.random.Generator,
                   run_mean: int = 12, max_skip: int = 8) -> Columns:
    """Thin one regular stream into alternating dense runs (every reading) and sparse runs (1 in 2..max_skip)."""
    keep = np.zeros(len(ts_ms), bool)
    i = int(rng.integers(0, 3))
    while i < len(ts_ms):
        run = int(rng.geometric(1.0 / run_mean))  # readings in this run
        if rng.random() < 0.5:
            keep[i:i + run] = True  # dense: a burst of consecutive readings
            i += run
        else:
            skip = int(rng.integers(2, max_skip + 1))  # sparse: a dropout pattern
            keep[i:i + run * skip:skip] = True
            i += run * skip
    return [device] * int(keep.sum()), ts_ms[keep], values[keep]


def _concat(parts: list[Columns]) -> Columns:
    return ([d for p in parts for d in p[0]], np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def recording_streams(ts: np.ndarray, v: np.ndarray, prefix: str, seed: int, thinnings: int, segment: int,
                      train_fraction: float = 0.6) -> tuple[Columns, Columns]:
    """Train / test streams from the first ``train_fraction`` of a regular recording and from the rest (never
    overlapping in time): each part is cut into ``segment``-reading pieces and every piece is thinned
    ``thinnings`` times by :func:`make_irregular`, each thinning a device."""
    cut = int(len(ts) * train_fraction)
    rng = np.random.default_rng(seed)

    def part(name: str, lo: int, hi: int) -> Columns:
        pieces = [(a, min(a + segment, hi)) for a in range(lo, hi - segment // 2, segment)]
        return _concat([make_irregular(f"{prefix}-{name}-{a}-{k}", ts[a:b], v[a:b], rng)
                        for a, b in pieces for k in range(thinnings)])

    return part("train", 0, cut), part("test", cut, len(ts))


def water_flow_streams(seed: int, thinnings: int = 8, segment: int = 192) -> tuple[Columns, Columns]:
    """WaterFlow in 192-hour pieces (8 days: several daily cycles, and short sequences train fast)."""
    ts, v = water_flow()
    return recording_streams(ts, v, "wf", seed, thinnings, segment)


def elnino_streams(seed: int, thinnings: int = 16, segment: int = 120) -> tuple[Columns, Columns]:
    """El Nino sea-surface temperature in 120-month pieces (10 annual cycles, about 40 readings thinned)."""
    ts, v = elnino()
    return recording_streams(ts, v, "elnino", seed, thinnings, segment)


def co2_streams(seed: int, thinnings: int = 8, segment: int = 156) -> tuple[Columns, Columns]:
    """Mauna Loa CO2 in 156-reading pieces (3 years: three annual cycles, about 80 readings once thinned)."""
    ts, v = co2()
    return recording_streams(ts, v, "co2", seed, thinnings, segment)


def smooth_sines(seed: int, devices: int, duration_s: float, mean_gap_s: float = 3.0) -> Columns:
    """A synthetic control where the gap must matter: per device the sum of two sines (periods 20-120 s,
    amplitudes 1 and 0.3-0.7) plus 5 % Gaussian noise, read at exponential gaps of mean ``mean_gap_s``.
    Over a 3 s gap a 20 s sine turns by about 1 rad, so where the next reading lies depends on the gap."""
    rng = np.random.default_rng(seed)
    parts: list[Columns] = []
    for d in range(devices):
        t = np.cumsum(rng.exponential(mean_gap_s, int(duration_s / mean_gap_s) + 50))  # s
        t = t[t < duration_s]
        period, phase = rng.uniform(20.0, 120.0, 2), rng.uniform(0.0, 2.0 * np.pi, 2)
        amp = np.array([1.0, rng.uniform(0.3, 0.7)])
        x = (amp[:, None] * np.sin(2.0 * np.pi * t[None, :] / period[:, None] + phase[:, None])).sum(0)
        x = x + 0.05 * rng.standard_normal(len(t))
        parts.append(([f"sine-{d}"] * len(t), np.round(t * 1000.0).astype(np.int64), x[:, None].astype(np.float32)))
    return _concat(parts)


def simulated(seed: int, devices: int, duration_s: float, keep: float = 0.5, anomaly_rate: float = 0.0,
              normal_prefix_s: float = 600.0) -> tuple[Columns, tuple[Incident, ...]]:
    """Simulator devices (already irregular) with each reading kept with probability ``keep``; also returns
    the simulator's incidents (ground truth) for peer comparisons."""
    sim = simulate(n_devices=devices, duration_s=duration_s, seed=seed, anomaly_rate=anomaly_rate,
                   normal_prefix_s=normal_prefix_s)
    mask = np.random.default_rng(seed + 1).random(len(sim.ts_ms)) < keep
    return ([str(d) for d in sim.device_ids[mask]], sim.ts_ms[mask], sim.values[mask]), sim.incidents
