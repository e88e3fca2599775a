"""``liquidstream report`` (liquidstream.pipeline.cli.ops), run through the real CLI entry point and parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from liquidstream.pipeline.cli import entry as cli
from liquidstream.pipeline.cli import ops as cli_ops

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0_MS = 1_767_225_600_000


@pytest.fixture
def liquidstream() -> Any:
    """``liquidstream.pipeline.cli.entry.main``, the console script's entry point, with its real command table."""
    return cli.main


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Six devices x 80 irregular readings of 2 channels, a forecast per reading, alerts and incidents:
    d1 alerted inside its incident (hit), d2 has an incident and no alert (miss), d3 an alert only."""
    rng = np.random.default_rng(3)
    readings, predictions = [], []
    for d in range(6):
        ts = T0_MS + np.cumsum(rng.integers(500, 3000, 80))
        values = np.sin(np.arange(80)[:, None] / 7.0 + d) + 0.1 * rng.standard_normal((80, 2))
        for i in range(80):
            readings.append({"device_id": f"d{d}", "ts": int(ts[i]), "values": values[i].round(4).tolist()})
            if i:
                predictions.append({"device_id": f"d{d}", "ts": int(ts[i - 1]), "forecast_ts": int(ts[i]),
                                    "forecast": values[i - 1].round(4).tolist(), "forecast_std": [0.2, 0.3]})
    incidents = [{"device_id": "d1", "start_ms": T0_MS + 40_000, "end_ms": T0_MS + 60_000},
                 {"device_id": "d2", "start_ms": T0_MS + 20_000, "end_ms": T0_MS + 30_000}]
    alerts = [{"device_id": "d1", "ts": T0_MS + 45_000, "score": 9.0}, {"device_id": "d3", "ts": T0_MS + 9_000}]
    return {"readings": _write(tmp_path / "readings.jsonl", readings),
            "predictions": _write(tmp_path / "predictions.jsonl", predictions),
            "alerts": _write(tmp_path / "alerts.jsonl", alerts),
            "incidents": _write(tmp_path / "incidents.jsonl", incidents)}


def _args(files: dict[str, str], *names: str) -> list[str]:
    return [a for n in names for a in (f"--{n}", files[n])]


def test_report_writes_a_png_of_the_interesting_devices(liquidstream: Any, files: dict[str, str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figs" / "report.png"
    rc = liquidstream(["report", *_args(files, "predictions", "alerts", "readings", "incidents"),
                       "--out", str(out), "--devices", "3"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(out), "devices": ["d1", "d2", "d3"], "alerts": 2, "incidents": 2,
                       "skipped_readings": 0}
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_report_without_incidents_defaults_to_four_devices(liquidstream: Any, files: dict[str, str],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert liquidstream(["report", *_args(files, "predictions", "alerts", "readings")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == "report.png" and len(summary["devices"]) == 4 and summary["devices"][0] == "d1"
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_MAGIC)


def test_report_errors_are_one_line_and_exit_2(liquidstream: Any, files: dict[str, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a PNG written by mistake lands here, not in the checkout
    missing = str(tmp_path / "nope.jsonl")
    assert liquidstream(["report", "--readings", missing, *_args(files, "predictions", "alerts")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"liquidstream report: error: --readings {missing}: no such file (")
    assert "\n" not in err
    empty = _write(tmp_path / "empty.jsonl", [])
    assert liquidstream(["report", "--readings", empty, *_args(files, "predictions", "alerts")]) == 2
    assert "no valid reading" in capsys.readouterr().err
    # read as replay and the worker read it: a bad line is skipped with its reason, not a crash
    bad = _write(tmp_path / "bad.jsonl", [{"device_id": "d0", "ts": "soon", "values": [1, 2]}])
    assert liquidstream(["report", "--readings", bad, *_args(files, "predictions", "alerts")]) == 2
    assert "no valid reading to plot (line 1: ts must be an integer (epoch ms), got string)" in capsys.readouterr().err


def test_report_flags_parse_with_the_real_parser() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["report", "--readings", "r", "--predictions", "p", "--alerts", "a"])
    assert (args.out, args.devices, args.incidents, args.plot_channels) == ("report.png", 4, None, 2)
    assert parser.parse_args(["report", "--readings", "r", "--predictions", "p", "--alerts", "a",
                              "--channels", "3"]).plot_channels == 3  # the old name, kept as an alias
    assert args._handlers["report"] is cli_ops._cmd_report
    assert isinstance(args, argparse.Namespace)
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--readings", "r", "--predictions", "p", "--alerts", "a", "--devices", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--predictions", "p", "--alerts", "a"])  # --readings is required
