"""``liquidstream evaluate nab`` on a tiny corpus in NAB's own layout (the real data stays in ../shared/data/nab):
the probation as each device's commissioning, the incident scores, and the JSON last line with its ablations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from liquidstream.pipeline.cli.entry import main
from liquidstream.pipeline.eval.detection import ABLATIONS
from liquidstream.pipeline.eval.nab_eval import devices_of
from liquidstream.pipeline.eval.nab_scoring import PROFILES, load_corpus

T0 = np.datetime64("2014-04-01T00:00:00")


def _stamp(i: int) -> str:
    return str(T0 + np.timedelta64(5 * i, "m")).replace("T", " ")


def write_corpus(root: Path, rows: int = 400, seed: int = 0) -> None:
    """Two files, one with a level shift inside its labelled window, one without any window."""
    rng = np.random.default_rng(seed)
    windows: dict[str, list[list[str]]] = {}
    for name, shift in (("synthetic/shifted.csv", True), ("synthetic/quiet.csv", False)):
        t = np.arange(rows)
        v = 10 + np.sin(2 * np.pi * t / 48) + 0.1 * rng.standard_normal(rows)
        if shift:
            v[300:] += 6.0
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("timestamp,value\n" + "".join(f"{_stamp(i)},{x:.4f}\n" for i, x in enumerate(v)))
        windows[name] = [[_stamp(290) + ".000000", _stamp(320) + ".000000"]] if shift else []
    (root / "labels").mkdir()
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    (root / "config").mkdir()
    (root / "config" / "profiles.json").write_text(json.dumps({
        name: {"CostMatrix": {"tpWeight": c.tp, "fnWeight": c.fn, "fpWeight": c.fp, "tnWeight": 1.0}}
        for name, c in PROFILES.items()}))


def test_probation_is_each_devices_commissioning(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    devices = devices_of(load_corpus(tmp_path))
    assert [(d.name, d.commissioning, d.values.shape) for d in devices] == [
        ("synthetic/quiet.csv", 60, (400, 1)), ("synthetic/shifted.csv", 60, (400, 1))]


def test_cli_prints_the_scoreboard_and_a_json_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_corpus(tmp_path)
    assert main(["evaluate", "nab", "--data-dir", str(tmp_path), "--json", "--epochs", "1", "--hidden-size", "8",
                 "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "Numenta HTM" in "\n".join(lines[:-1])
    last = json.loads(lines[-1])
    assert set(last["ablations"]) == set(ABLATIONS)
    for key in ("standard", "reward_low_fp", "reward_low_fn"):
        assert -1000 < last[key] <= 100.0 and last[key] == last["ablations"]["full"][key]
    assert last["mse_model"] > 0 and last["mse_persistence"] > 0
    assert last["windows"] == 1 and last["files"] == 2


def test_missing_data_dir_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "nab", "--data-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not NAB's folder" in err and "Traceback" not in err
    assert main(["evaluate", "nab", "--quiet"]) == 2
