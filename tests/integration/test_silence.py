"""Silence alerts on the alerts topic of a real broker: a device quiet while the others go on gets one opened and one
closed record (``resumed``), in committed transactions; once the whole stream stops, the worker's timer opens a
silence for every device of its idle partitions."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer

from liquidstream.pipeline.wire.contract import AlertRecord
from tests.integration.conftest import Topics, drain, finish, run_cmd, spawn

pytestmark = pytest.mark.integration

DEVICES = 8
GAP_MS = 100  # every device reads every 100 ms of event time: silent after 1 s (10 usual gaps)


def test_silences_open_and_close_on_the_alerts_topic(kafka_bootstrap: str, topics: Topics, trained_model: Path,
                                                    tmp_path: Path, processes: list[subprocess.Popen[str]],
                                                    group: str) -> None:
    t0 = (int(time.time()) - 600) * 1000  # recent event times (outputs carry them; retention is 7 days)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for k in range(300):
        for d in range(DEVICES):
            if d == 0 and 100 <= k < 150:  # dev-0 is quiet for 5 s of stream time while the others go on
                continue
            value = {"device_id": f"dev-{d}", "ts": t0 + k * GAP_MS + d, "values": [0.1 * d, 1.0, 2.0, 3.0]}
            producer.produce(topics.input, value=json.dumps(value).encode(), key=f"dev-{d}".encode())
    assert producer.flush(30) == 0
    log = tmp_path / "worker.log"
    # idle for 14 s > the 10 s housekeeping timer: it sees every partition idle, every device silent
    worker = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "14",
                           "--batch-max-messages", "500"), log, processes)
    rc, stats = finish(worker, log)
    assert rc == 0, log.read_text()[-4000:]
    assert "silence alerts opened" in log.read_text()
    records = [r.json() for r in drain(kafka_bootstrap, topics.alerts)]
    assert all(AlertRecord.model_validate(r) for r in records)
    silences = [r for r in records if r["reason"] == "silence"]
    first = [r for r in silences if r["device_id"] == "dev-0" and r["ts"] < t0 + 200 * GAP_MS]
    assert [(r["event"], r["alert_id"]) for r in first] == [("opened", first[0]["alert_id"])] * 1 + [
        ("closed", first[0]["alert_id"])]
    last_before = t0 + 99 * GAP_MS
    assert last_before + 5 * GAP_MS < first[0]["ts"] < t0 + 150 * GAP_MS  # began about 10 usual gaps after
    assert first[1]["closed_by"] == "resumed" and first[1]["ts"] == t0 + 150 * GAP_MS
    at_end = Counter(r["device_id"] for r in silences if r["ts"] > t0 + 299 * GAP_MS and r["event"] == "opened")
    assert at_end == Counter(f"dev-{d}" for d in range(DEVICES))  # the timer: one per device, none closed
    assert stats["alerts"] >= 1 + DEVICES
