"""Tests of the synthetic stream generator (liquidstream.pipeline.offline.simulator)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from liquidstream.operators.errors import ConfigError
from liquidstream.pipeline.offline.simulator import KINDS, MIN_SEPARATION_S, Incident, SimulatedStream, simulate

PREFIX_S = 300.0  # s, normal prefix used by the incident tests


@pytest.fixture(scope="module")
def pair() -> tuple[SimulatedStream, SimulatedStream]:
    """The same seed with and without anomalies: 24 devices for an hour, ~6 incidents per device-hour."""
    kwargs = {"n_devices": 24, "duration_s": 3600.0, "seed": 11, "normal_prefix_s": PREFIX_S}
    return simulate(anomaly_rate=6.0, **kwargs), simulate(anomaly_rate=0.0, **kwargs)  # type: ignore[arg-type]


def _rows(s: SimulatedStream, device_id: str) -> np.ndarray:
    return np.flatnonzero(s.device_ids == device_id)


def _per_device_gaps_s(s: SimulatedStream) -> dict[str, np.ndarray]:
    return {d: np.diff(s.ts_ms[_rows(s, d)]) / 1000.0 for d in sorted(set(s.device_ids))}


def test_deterministic_by_seed() -> None:
    a, b = simulate(n_devices=4, duration_s=900.0, seed=5), simulate(n_devices=4, duration_s=900.0, seed=5)
    assert np.array_equal(a.ts_ms, b.ts_ms) and np.array_equal(a.device_ids, b.device_ids)
    assert np.array_equal(a.values, b.values) and a.incidents == b.incidents
    c = simulate(n_devices=4, duration_s=900.0, seed=6)
    assert len(c.ts_ms) != len(a.ts_ms) or not np.array_equal(c.values, a.values)


def test_devices_do_not_depend_on_fleet_size() -> None:
    small = simulate(n_devices=2, duration_s=600.0, seed=2)
    big = simulate(n_devices=5, duration_s=600.0, seed=2)
    keep = np.isin(big.device_ids, small.device_ids)
    assert np.array_equal(big.ts_ms[keep], small.ts_ms) and np.array_equal(big.values[keep], small.values)


def test_shapes_dtypes_and_ids() -> None:
    s = simulate(n_devices=3, duration_s=120.0, channels=2, seed=0, start_ms=1_700_000_000_000)
    n = len(s.ts_ms)
    assert s.device_ids.dtype == object and s.device_ids.shape == (n,)
    assert all(isinstance(d, str) for d in s.device_ids)
    assert s.ts_ms.dtype == np.int64 and s.values.dtype == np.float32 and s.values.shape == (n, 2)
    assert np.isfinite(s.values).all()
    assert sorted(set(s.device_ids)) == ["dev-0000", "dev-0001", "dev-0002"]
    assert s.ts_ms.min() >= 1_700_000_000_000 and s.ts_ms.max() < 1_700_000_000_000 + 120_000


def test_global_sort_and_deterministic_ties(pair: tuple[SimulatedStream, SimulatedStream]) -> None:
    s = pair[0]
    dts = np.diff(s.ts_ms)
    assert (dts >= 0).all()
    tied = np.flatnonzero(dts == 0)
    assert all(s.device_ids[i] < s.device_ids[i + 1] for i in tied)
    for gaps in _per_device_gaps_s(s).values():
        assert (gaps > 0).all()  # one reading per device per millisecond


def test_sampling_is_irregular(pair: tuple[SimulatedStream, SimulatedStream]) -> None:
    gaps = _per_device_gaps_s(pair[0])
    every = np.concatenate(list(gaps.values()))
    assert (every < 0.25).sum() > 100  # bursts
    assert (every > 20.0).sum() >= 5  # dropouts
    assert every.std() / every.mean() > 0.5
    means = [float(np.median(g)) for g in gaps.values()]
    assert max(means) / min(means) > 2.0  # devices run at different rates


def test_levels_and_scales_differ_between_devices(pair: tuple[SimulatedStream, SimulatedStream]) -> None:
    clean = pair[1]
    stds = np.array([clean.values[_rows(clean, d), 0].std() for d in sorted(set(clean.device_ids))])
    means = np.array([clean.values[_rows(clean, d), 0].mean() for d in sorted(set(clean.device_ids))])
    assert stds.max() / stds.min() > 10.0 and np.ptp(means) > 100.0


def test_incidents_are_well_placed(pair: tuple[SimulatedStream, SimulatedStream]) -> None:
    s = pair[0]
    assert 60 <= len(s.incidents) <= 200
    assert {i.kind for i in s.incidents} == set(KINDS)
    assert list(s.incidents) == sorted(s.incidents, key=lambda i: (i.start_ms, i.device_id))
    by_device: dict[str, list[Incident]] = {}
    for inc in s.incidents:
        ts = s.ts_ms[_rows(s, inc.device_id)]
        assert inc.start_ms in ts and inc.end_ms in ts and inc.start_ms <= inc.end_ms
        assert inc.start_ms - ts[0] >= PREFIX_S * 1000
        assert inc.channels == tuple(sorted(set(inc.channels))) and 1 <= len(inc.channels) <= 4
        assert all(0 <= c < 4 for c in inc.channels)
        by_device.setdefault(inc.device_id, []).append(inc)
    for incidents in by_device.values():
        for a, b in zip(incidents, incidents[1:], strict=False):
            assert b.start_ms - a.end_ms >= MIN_SEPARATION_S * 1000


def test_no_incidents_without_rate_or_in_short_runs() -> None:
    assert simulate(n_devices=5, duration_s=900.0, anomaly_rate=0.0).incidents == ()
    assert simulate(n_devices=5, duration_s=500.0, anomaly_rate=50.0, normal_prefix_s=600.0).incidents == ()


def test_anomalies_change_exactly_their_windows(pair: tuple[SimulatedStream, SimulatedStream]) -> None:
    """Against the clean run of the same seed: identical outside incidents, clearly abnormal inside."""
    noisy, clean = pair
    assert np.array_equal(noisy.ts_ms, clean.ts_ms) and np.array_equal(noisy.device_ids, clean.device_ids)
    touched = np.zeros(noisy.values.shape, dtype=bool)
    checked = dict.fromkeys(KINDS, 0)
    for inc in noisy.incidents:
        rows = _rows(noisy, inc.device_id)
        ts = noisy.ts_ms[rows]
        win = rows[(ts >= inc.start_ms) & (ts <= inc.end_ms)]
        ch = list(inc.channels)
        touched[np.ix_(win, ch)] = True
        std = clean.values[rows][:, ch].astype(np.float64).std(axis=0)  # channel std of the clean device
        got, want = noisy.values[np.ix_(win, ch)].astype(np.float64), clean.values[np.ix_(win, ch)]
        diff = np.abs(got - want) / std
        if inc.kind == "spike":
            assert 1 <= len(win) <= 3 and diff.min() > 5.9 and diff.max() < 10.1
        elif inc.kind == "level_shift":
            assert inc.end_ms - inc.start_ms <= 120_000
            assert diff.min() > 2.9 and diff.max() < 6.1
            assert np.allclose(diff, diff[0], rtol=1e-3, atol=1e-3)  # a constant offset per channel
        elif inc.kind == "stuck":
            assert len(win) >= 3 and (got == got[0]).all()  # exact repeats of the first value
            assert np.array_equal(got[0], want[0]) and (diff[1:] > 0).any()
        else:  # frequency_change: same amplitude, different oscillation
            assert len(win) >= 3 and diff.max() > 0.3
            lo, hi = clean.values[rows][:, ch].min(axis=0), clean.values[rows][:, ch].max(axis=0)
            assert (got >= lo - 1.5 * std).all() and (got <= hi + 1.5 * std).all()  # no amplitude blow-up
        checked[inc.kind] += 1
    assert min(checked.values()) >= 5
    assert np.array_equal(noisy.values[~touched], clean.values[~touched])


def test_jsonl_round_trip(tmp_path: Path) -> None:
    s = simulate(n_devices=3, duration_s=900.0, seed=4, anomaly_rate=8.0, normal_prefix_s=60.0)
    assert s.incidents
    s.to_jsonl(tmp_path / "r.jsonl")
    s.incidents_jsonl(tmp_path / "i.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert lines == list(s.records())
    assert set(lines[0]) == {"device_id", "ts", "values"}
    assert [r["device_id"] for r in lines] == s.device_ids.tolist()
    assert np.array_equal(np.array([r["ts"] for r in lines], dtype=np.int64), s.ts_ms)
    assert np.array_equal(np.array([r["values"] for r in lines], dtype=np.float32), s.values)  # exact
    back = [json.loads(line) for line in (tmp_path / "i.jsonl").read_text().splitlines()]
    assert tuple(Incident(**{**d, "channels": tuple(d["channels"])}) for d in back) == s.incidents


def test_split_by_time(pair: tuple[SimulatedStream, SimulatedStream]) -> None:
    s = pair[0]
    head, tail = s.split_by_time(0.25)
    assert len(head.ts_ms) + len(tail.ts_ms) == len(s.ts_ms)
    assert (np.diff(head.ts_ms) >= 0).all() and (np.diff(tail.ts_ms) >= 0).all()
    for d in sorted(set(s.device_ids)):
        h, t, full = head.ts_ms[_rows(head, d)], tail.ts_ms[_rows(tail, d)], s.ts_ms[_rows(s, d)]
        assert h.max() < t.min() and np.array_equal(np.concatenate([h, t]), full)
        assert math.isclose((h.max() - full[0]) / (full[-1] - full[0]), 0.25, abs_tol=0.1)
        assert np.array_equal(np.concatenate([head.values[_rows(head, d)], tail.values[_rows(tail, d)]]),
                              s.values[_rows(s, d)])
    assert set(head.incidents) | set(tail.incidents) == set(s.incidents)
    assert head.incidents and tail.incidents
    for inc in head.incidents:
        assert inc.start_ms <= head.ts_ms[_rows(head, inc.device_id)].max()
    for inc in tail.incidents:
        assert inc.start_ms >= tail.ts_ms[_rows(tail, inc.device_id)].min()
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ConfigError):
            s.split_by_time(bad)


@pytest.mark.parametrize("kwargs", [{"n_devices": 0}, {"channels": 0}, {"duration_s": 0.0},
                                    {"mean_gap_s": -1.0}, {"anomaly_rate": -0.1},
                                    {"normal_prefix_s": -1.0}, {"duration_s": float("nan")}])
def test_bad_arguments_raise_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        simulate(**kwargs)  # type: ignore[arg-type]
