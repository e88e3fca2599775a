"""The embedded demo on a small fleet: every artefact is written and the figures are consistent."""

from __future__ import annotations

import json
from pathlib import Path

from liquidstream.pipeline.offline.demo import DemoConfig, run_demo
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.contract import AlertRecord, PredictionRecord


def test_small_demo_writes_consistent_outputs(tmp_path: Path) -> None:
    cfg = DemoConfig(devices=12, duration_s=900.0, train_s=300.0, epochs=1, hidden_size=8, anomaly_rate=6.0)
    summary = run_demo(Settings(), tmp_path, cfg, show=False)
    for name in ("summary.json", "predictions.jsonl", "alerts.jsonl", "incidents.jsonl", "model.pt", "plot.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("events", "devices", "predictions", "alerts", "precision", "recall", "events_per_s"):
        assert key in on_disk
    preds = (tmp_path / "predictions.jsonl").read_text().splitlines()
    alerts = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert len(preds) == summary["predictions"] == summary["events"]  # simulator emits no late/duplicates
    events = [(json.loads(line)["event"], json.loads(line)["reason"] == "silence") for line in alerts]
    assert events.count(("opened", False)) == summary["alerts"] and events.count(("closed", False)) == \
        summary["alerts_closed"]
    assert events.count(("opened", True)) == summary["silence_alerts"] > 0  # the simulator's dropouts
    opened = {json.loads(line)["alert_id"] for line in alerts if json.loads(line)["event"] == "opened"}
    closed = [json.loads(line)["alert_id"] for line in alerts if json.loads(line)["event"] == "closed"]
    assert len(closed) == len(set(closed)) and set(closed) <= opened, "each alert closes once, after it opened"
    # the demo writes the same published records as replay and the worker: each validates against the contract
    for k, line in enumerate(preds, start=1):
        assert PredictionRecord.model_validate_json(line).source.model_dump() == {"file": "demo:simulator", "line": k}
    assert alerts and all(AlertRecord.model_validate_json(line) for line in alerts)
    assert summary["devices"] == 12
    assert 0.0 <= summary["precision"] <= 1.0 and 0.0 <= summary["recall"] <= 1.0
    assert summary["incidents"]["incidents"] > 0
    assert summary["events_per_s"] > 0
