"""File replay: every line is accounted for, invalid lines are reported with number and reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from liquidstream.operators.model_io import load_model
from liquidstream.pipeline.offline.replay import ReplayConfig, run_replay
from liquidstream.pipeline.offline.simulator import simulate
from liquidstream.pipeline.settings import Settings

T0 = 1_767_225_600_000


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _reading(dev: str, ts: int, values: list[float]) -> str:
    return json.dumps({"device_id": dev, "ts": ts, "values": values})


def _jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_line_is_a_prediction_or_reported(tmp_path: Path) -> None:
    lines = [
        _reading("a", T0, [1.0, 2.0]),
        _reading("a", T0 + 1000, [1.1, 2.0]),
        "not json",
        _reading("b", T0, [1.0]),  # wrong length
        _reading("a", T0 + 1000, [1.1, 2.0]),  # duplicate of line 2
        '{"device_id": "b", "ts": 1767225601000, "values": [NaN, 1]}',
        _reading("b", 5, [1.0, 1.0]),  # absurd timestamp (1970)
        _reading("b", T0 + 3000, [3.0, 4.0]),
    ]
    out = tmp_path / "out"
    summary = run_replay(Settings(), _write(tmp_path / "in.jsonl", lines), out, ReplayConfig(), show=False)
    assert summary["lines"] == 8
    assert summary["predictions"] + summary["invalid"] == 8
    invalid = {int(r["line"]): r["reason"] for r in _jsonl(out / "invalid.jsonl")}  # type: ignore[call-overload]
    assert invalid == {3: "malformed_json", 4: "wrong_length", 5: "duplicate", 6: "non_finite",
                       7: "bad_timestamp"}
    preds = _jsonl(out / "predictions.jsonl")
    assert [(p["device_id"], p["ts"]) for p in preds] == [("a", T0), ("a", T0 + 1000), ("b", T0 + 3000)]
    assert preds[0]["status"] == "first" and preds[0]["score"] is None
    assert isinstance(preds[1]["score"], float)
    assert preds[1]["forecast_ts"] > preds[1]["ts"]  # type: ignore[operator]


def test_train_fraction_trains_and_saves_a_loadable_model(tmp_path: Path) -> None:
    sim = simulate(n_devices=6, duration_s=240.0, seed=3, anomaly_rate=0.0, normal_prefix_s=0.0)
    src = tmp_path / "sim.jsonl"
    sim.to_jsonl(src)
    out = tmp_path / "out"
    cfg = ReplayConfig(train_fraction=0.5, epochs=1, hidden_size=8)
    summary = run_replay(Settings(), src, out, cfg, show=False)
    assert summary["predictions"] == len(sim.ts_ms)
    model, doc = load_model(out / "model.pt")
    assert doc["version"] == summary["model_version"] != "untrained"
    assert model.n_channels == sim.values.shape[1]
    # the saved model drives a second replay and reports its version on every prediction
    again = run_replay(Settings(), src, tmp_path / "again", ReplayConfig(model=out / "model.pt"), show=False)
    versions = {p["model_version"] for p in _jsonl(tmp_path / "again" / "predictions.jsonl")}
    assert versions == {summary["model_version"]} and again["predictions"] == summary["predictions"]


def test_file_without_any_reading_is_a_clear_error(tmp_path: Path) -> None:
    from liquidstream.pipeline.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="no line"):
        run_replay(Settings(), _write(tmp_path / "x.jsonl", ["garbage", "[]"]), tmp_path / "o", ReplayConfig(),
                   show=False)


def test_commissioning_readings_never_alert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--commissioning N``: a device's first N readings are normal by declaration, so an oddity among them
    opens no alert, while the same oddity after them does; ``--train-fraction`` sets it per device to the
    device's training part."""
    from liquidstream.pipeline.cli.entry import main

    values = [[1.0 + 0.01 * (k % 5), 2.0 + 0.02 * (k % 3)] for k in range(300)]
    values[250] = [90.0, -50.0]
    src = _write(tmp_path / "in.jsonl", [_reading("a", T0 + 1000 * k, v) for k, v in enumerate(values)])

    def alerts_with(*flags: str) -> list[object]:
        out = tmp_path / "o" / "-".join(flags)
        assert main(["replay", "--input", str(src), "--out", str(out), "--quiet", *flags]) == 0
        preds = _jsonl(out / "predictions.jsonl")
        assert all(0.0 <= float(p["anomaly_score"]) <= 1.0 for p in preds[1:])  # type: ignore[arg-type]
        records = _jsonl(out / "alerts.jsonl")
        opened = [a for a in records if a["event"] == "opened"]
        closed = [a for a in records if a["event"] == "closed"]
        assert [a["alert_id"] for a in closed] == [a["alert_id"] for a in opened], "each alert closes once"
        assert all(a["opened_ts"] < a["ts"] and a["readings"] >= 2 for a in closed)
        return [a["ts"] for a in opened]

    assert alerts_with("--commissioning", "200") == [T0 + 250_000]
    assert alerts_with("--commissioning", "280") == []
    assert alerts_with("--train-fraction", "0.7", "--epochs", "1", "--hidden-size", "8") == [T0 + 250_000]
    assert alerts_with("--train-fraction", "0.9", "--epochs", "1", "--hidden-size", "8") == []
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: one usage line, exit 2
        main(["replay", "--input", str(src), "--out", str(tmp_path / "x"), "--commissioning", "-1"])
    assert "--commissioning: must be >= 0" in capsys.readouterr().err


def test_a_device_that_falls_silent_gets_a_silence_alert_in_the_replay_output(tmp_path: Path) -> None:
    """q reads every second for 10 minutes; p every second, then nothing for 2 minutes, then again; at the end p
    stops early (the file ends before q): one silence closed by p's return and one still open."""
    lines, t_end = [], T0 + 600_000
    for t in range(T0, t_end, 1000):
        lines.append(_reading("q", t, [1.0]))
        if t < T0 + 60_000 or T0 + 180_000 <= t < T0 + 500_000:
            lines.append(_reading("p", t + 300, [2.0]))
    out = tmp_path / "out"
    run_replay(Settings(batch_max_messages=100), _write(tmp_path / "in.jsonl", lines), out, ReplayConfig(hidden_size=4),
               show=False)
    silences = [a for a in _jsonl(out / "alerts.jsonl") if a["reason"] == "silence"]
    assert [(a["event"], a["device_id"], a["ts"]) for a in silences] == [
        ("opened", "p", T0 + 59_300 + 10_000),  # usual gap 1 s: silent 10 s after its last reading
        ("closed", "p", T0 + 180_300),
        ("opened", "p", T0 + 499_300 + 10_000)]
    opened, closed = silences[0], silences[1]
    assert closed["alert_id"] == opened["alert_id"] == f"p@{T0 + 69_300}" and closed["closed_by"] == "resumed"
    assert closed["score"] == pytest.approx(121.0) and opened["threshold"] == 10.0
    assert opened["source"]["line"] < closed["source"]["line"]  # noticed while q moved on, before p came back
