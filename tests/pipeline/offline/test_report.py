"""Tests of the PNG report (liquidstream.pipeline.offline.report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from liquidstream.operators.errors import ConfigError, InputError
from liquidstream.pipeline.offline.report import DeviceSeries, device_ids_of, load_series, pick_devices, plot_devices
from liquidstream.pipeline.offline.simulator import simulate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _series_from_simulation() -> list[DeviceSeries]:
    """Three simulated devices with a fake forecaster (the next reading, slightly off) and alerts."""
    s = simulate(n_devices=3, duration_s=900.0, seed=7, anomaly_rate=6.0, normal_prefix_s=300.0)
    out = []
    for dev in sorted(set(s.device_ids)):
        rows = s.device_ids == dev
        ts, values = s.ts_ms[rows], s.values[rows].astype(np.float64)
        std = np.broadcast_to(0.2 * values.std(axis=0), values[1:].shape)
        incidents = [(i.start_ms, i.end_ms) for i in s.incidents if i.device_id == dev]
        out.append(DeviceSeries(dev, ts, values, ts[1:], values[:-1], std,
                                np.array([a + 2_000 for a, _ in incidents], dtype=np.int64), incidents))
    return out


def test_plot_devices_writes_a_png(tmp_path: Path) -> None:
    series = _series_from_simulation()
    assert any(s.incidents for s in series)
    path = plot_devices(tmp_path / "sub" / "report.png", series, title="simulated devices")
    assert path == tmp_path / "sub" / "report.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 30_000
    one = plot_devices(tmp_path / "one.png", series[:1], max_channels=1)
    assert 5_000 < one.stat().st_size < len(data)


def test_plot_handles_empty_parts(tmp_path: Path) -> None:
    empty = np.array([], dtype=np.int64)
    bare = DeviceSeries("d", np.array([0, 1_000, 2_500]), np.array([1.0, 2.0, 1.5]), empty,
                        np.zeros((0, 1)), np.zeros((0, 1)), empty)
    assert bare.values.shape == (3, 1)
    assert plot_devices(tmp_path / "bare.png", [bare]).read_bytes().startswith(PNG_MAGIC)


def test_plot_does_not_touch_pyplot_or_the_global_backend(tmp_path: Path) -> None:
    import matplotlib

    backend, had_pyplot = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    plot_devices(tmp_path / "x.png", _series_from_simulation()[:1])
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


def test_bad_inputs_raise() -> None:
    empty = np.array([], dtype=np.int64)
    with pytest.raises(InputError):
        DeviceSeries("d", np.array([1, 2]), np.zeros((3, 2)), empty, np.zeros((0, 2)), np.zeros((0, 2)),
                     empty)
    with pytest.raises(InputError):
        DeviceSeries("d", empty, np.zeros((0, 1)), np.array([5]), np.zeros((1, 2)), np.zeros((1, 1)), empty)
    with pytest.raises(ConfigError):
        plot_devices("unused.png", [])


def test_load_series_parses_small_files(tmp_path: Path) -> None:
    readings = _write(tmp_path / "readings.jsonl", [
        {"device_id": "b", "ts": 2_000, "values": [2.0, 20.0]},
        {"device_id": "a", "ts": 1_000, "values": [1.0, 10.0]},
        {"device_id": "c", "ts": 1_000, "values": [9.0, 9.0]},
        {"device_id": "a", "ts": 500, "values": [0.5, 5.0]},  # out of order: sorted on load
    ])
    (tmp_path / "predictions.jsonl").write_text(
        json.dumps({"device_id": "a", "ts": 500, "forecast": [0.9, 9.0], "forecast_std": [0.1, 1.0],
                    "forecast_ts": 1_000, "score": None}) + "\n\n"  # blank lines are skipped
        + json.dumps({"device_id": "a", "ts": 1_000, "forecast": [1.1, 11.0], "forecast_std": [0.2, 2.0]})
        + "\n", encoding="utf-8")
    alerts = _write(tmp_path / "alerts.jsonl", [{"device_id": "a", "ts": 1_000, "score": 9.0},
                                                 {"device_id": "c", "ts": 1_000}])
    incidents = _write(tmp_path / "incidents.jsonl", [{"device_id": "b", "kind": "spike", "start_ms": 2_000,
                                                       "end_ms": 2_000, "channels": [0]}])
    got = load_series(readings, tmp_path / "predictions.jsonl", alerts, ["a", "b", "a"], incidents)
    assert [s.device_id for s in got] == ["a", "b"]
    a, b = got
    assert a.ts_ms.tolist() == [500, 1_000] and a.values.tolist() == [[0.5, 5.0], [1.0, 10.0]]
    assert a.forecast_ts_ms.tolist() == [1_000, 1_000]  # explicit forecast_ts, then the ts fallback
    assert a.forecast.tolist() == [[0.9, 9.0], [1.1, 11.0]] and a.forecast_std[:, 1].tolist() == [1.0, 2.0]
    assert a.alert_ts_ms.tolist() == [1_000] and a.incidents == ()
    assert b.values.shape == (1, 2) and b.forecast.shape == (0, 1) and b.incidents == ((2_000, 2_000),)
    without = load_series(readings, None, None, ["c"])
    assert without[0].alert_ts_ms.size == 0 and without[0].forecast_ts_ms.size == 0
    assert plot_devices(tmp_path / "loaded.png", got).stat().st_size > 5_000


@pytest.mark.parametrize("line", ["{not json", '["a list"]', '{"device_id": "a", "values": [1.0]}',
                                  '{"device_id": "a", "ts": 1, "values": "x1"}'])
def test_load_series_reports_malformed_lines(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"device_id": "a", "ts": 0, "values": [1.0]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="bad.jsonl:2"):
        load_series(path, None, None, ["a"])


def test_load_series_rejects_ragged_channels(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.jsonl", [{"device_id": "a", "ts": 0, "values": [1.0]},
                                         {"device_id": "a", "ts": 1, "values": [1.0, 2.0]}])
    with pytest.raises(InputError, match="channel counts"):
        load_series(path, None, None, ["a"])


def test_pick_devices_prefers_interesting_ones(tmp_path: Path) -> None:
    ids = ["quiet1", "hit", "miss", "false", "quiet2", "hit2"]
    alerts = ["hit", "false", "hit2", "hit2"]
    incidents = ["hit", "miss", "hit2"]
    assert pick_devices(ids, alerts, incidents, n=4) == ["hit2", "miss", "false", "quiet1"]
    assert pick_devices(ids, alerts, incidents, n=5) == ["hit2", "miss", "false", "quiet1", "hit"]
    assert pick_devices(["x"], n=3) == ["x"]
    path = _write(tmp_path / "alerts.jsonl", [{"device_id": d, "ts": 0} for d in alerts])
    assert device_ids_of(path) == alerts
    with pytest.raises(ConfigError):
        pick_devices(ids, n=0)
