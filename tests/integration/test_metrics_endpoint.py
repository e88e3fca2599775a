"""``liquidstream run`` serving ``/metrics``, ``/healthz`` and ``/readyz`` while it works a real broker.

The worker runs as a subprocess with ``--metrics-port 0`` (an ephemeral port, read back from its log line).
Readings go in in two waves; between the waves and after them the endpoint is scraped over HTTP, as Prometheus
and the kubelet would, and its counters must match the traffic exactly: events processed = messages consumed
so far, one prediction per valid reading, dead letters by reason for the malformed and late messages, devices,
the served model's version, consumer lag back at 0, and ``/readyz`` 200 once the partitions are assigned and
restored.  SIGTERM then stops the worker with exit code 0 and the port is released.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Topics, cli, drain, finish, spawn

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
PORT_LINE = re.compile(r"serving /metrics, /healthz, /readyz on [^\s:]+:(\d+)")
WAIT_S = 90.0  # seconds for the worker to start, or to catch up with a wave
CHANNELS = 4


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.read().decode()


def _scrape(port: int) -> Samples:
    status, text = _get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _series(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(lbls)[label]: v for (n, lbls), v in samples.items() if n == name}


def _until(what: str, check: Callable[[], bool], proc: subprocess.Popen[str], log: Path,
           timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert proc.poll() is None, f"worker exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def _reading(device: str, ts: int, values: list[float] | None = None) -> tuple[bytes, bytes]:
    values = values if values is not None else [1.0 + (ts // 1000) % 7 * 0.1] * CHANNELS
    return device.encode(), json.dumps({"device_id": device, "ts": ts, "values": values}).encode()


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in messages:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def test_metrics_health_and_readiness_follow_the_traffic(kafka_bootstrap: str, topics: Topics, trained_model: Path,
                                                         tmp_path: Path, processes: list[subprocess.Popen[str]],
                                                         group: str) -> None:
    from liquidstream.operators.model_io import load_model

    version = str(load_model(trained_model, "cpu")[1]["version"])
    log = tmp_path / "worker.log"
    worker = spawn(cli("run", "--bootstrap", kafka_bootstrap, "--input-topic", topics.input, "--predictions-topic",
                       topics.predictions, "--alerts-topic", topics.alerts, "--dlq-topic", topics.dlq, "--group-id",
                       group, "--model", str(trained_model), "--device", "cpu", "--worker-id", "metrics-it",
                       "--metrics-port", "0", "--exit-when-idle", "120", "--batch-max-messages", "100"),
                   log, processes, env={"LIQUIDSTREAM_LOG_FORMAT": "json"})
    _until("metrics port in the log", lambda: PORT_LINE.search(log.read_text()) is not None, worker, log)
    line = next(ln for ln in log.read_text().splitlines() if PORT_LINE.search(ln))
    doc = json.loads(line)  # structured logs (liquidstream.pipeline.ops.logs), the worker id on every line
    port = int(doc["metrics_port"])
    assert port > 0 and doc["worker"] == "metrics-it" and doc["level"] == "INFO"

    status, body = _get(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _get(port, "/readyz")  # usually still joining the group: then 503 with the reason
    assert status == 200 or json.loads(body)["reason"] in ("no partition assignment yet", "worker not ready "
                                                           "(joining the group or restoring state)") or \
        json.loads(body)["reason"].startswith("restoring state of"), body
    _until("/readyz 200", lambda: _get(port, "/readyz")[0] == 200, worker, log)
    first = _scrape(port)
    assert _value(first, "liquidstream_events_processed_total") == 0.0
    assert _value(first, "liquidstream_restore_progress") == 1.0
    assert _series(first, "liquidstream_model_version", "version") == {version: 1.0}

    # Wave 1: 5 devices x 40 readings, ten minutes old, and two malformed messages.
    base = time.time_ns() // 1_000_000 - 600_000
    wave1 = [_reading(f"dev-{d}", base + 1000 * i) for i in range(40) for d in range(5)]
    wave1 += [(b"broken", b"{not json"), (b"dev-0", json.dumps({"device_id": "dev-0", "ts": base}).encode())]
    _produce(kafka_bootstrap, topics.input, wave1)
    _until("wave 1 processed", lambda: _value(_scrape(port), "liquidstream_events_processed_total") == len(wave1),
           worker, log)
    one = _scrape(port)
    assert _value(one, "liquidstream_predictions_total") == 200
    assert _series(one, "liquidstream_dead_letters_total", "reason") == {"malformed_json": 1.0, "schema": 1.0}
    assert _value(one, "liquidstream_devices") == 5 and _value(one, "liquidstream_late_events_total") == 0
    assert _value(one, "liquidstream_end_to_end_latency_seconds_count") == 200
    latency_sum = _value(one, "liquidstream_end_to_end_latency_seconds_sum") or 0.0
    assert 200 * 560 < latency_sum < 200 * 3600  # readings 560..600 s old when published
    batches = _value(one, "liquidstream_batch_seconds_count") or 0.0
    assert batches >= 3  # batches of <= 100 messages
    assert _get(port, "/readyz")[0] == 200 and _get(port, "/healthz")[0] == 200

    # Wave 2: the same devices later on, three new ones, one late reading and one of the wrong length.
    wave2 = [_reading(f"dev-{d}", base + 1000 * (40 + i)) for i in range(20) for d in range(8)]
    wave2 += [_reading("dev-1", base + 500), _reading("dev-2", base + 100_000, [1.0] * (CHANNELS - 1))]
    _produce(kafka_bootstrap, topics.input, wave2)
    total = len(wave1) + len(wave2)
    _until("wave 2 processed", lambda: _value(_scrape(port), "liquidstream_events_processed_total") == total,
           worker, log)
    two = _scrape(port)
    assert _value(two, "liquidstream_predictions_total") == 360
    assert _series(two, "liquidstream_dead_letters_total", "reason") == {
        "malformed_json": 1.0, "schema": 1.0, "late": 1.0, "wrong_length": 1.0}
    assert _value(two, "liquidstream_late_events_total") == 1 and _value(two, "liquidstream_devices") == 8
    assert _value(two, "liquidstream_end_to_end_latency_seconds_count") == 360
    assert (_value(two, "liquidstream_batch_seconds_count") or 0.0) > batches
    assert _series(two, "liquidstream_model_version", "version") == {version: 1.0}

    # Lag comes from librdkafka's statistics (every 5 s): every assigned partition, caught up.
    _until("consumer lag 0 on all partitions",
           lambda: _series(_scrape(port), "liquidstream_consumer_lag", "partition") == dict.fromkeys("0123", 0.0),
           worker, log, timeout_s=30.0)
    assert _get(port, "/readyz") == (200, json.dumps({"status": "ready", "reason": "ready"}) + "\n")
    alerts_total = _value(_scrape(port), "liquidstream_alerts_total")

    worker.send_signal(signal.SIGTERM)
    rc, stats = finish(worker, log, 60)
    assert rc == 0, log.read_text()[-4000:]
    assert (stats["consumed"], stats["predictions"], stats["dead_letters"]) == (total, 360, 4)
    assert alerts_total == stats["alerts"]
    assert len(drain(kafka_bootstrap, topics.predictions)) == 360
    assert sum(r.json()["event"] == "opened" for r in drain(kafka_bootstrap, topics.alerts)) == stats["alerts"]
    with pytest.raises(urllib.error.URLError):  # the server went with the process
        _get(port, "/healthz")
