"""``GET /devices/{id}`` on two ``liquidstream run`` workers of one group on the real broker.

Readings of 8 devices go to a 4-partition topic (librdkafka's default partitioner places them); the two workers
split the partitions.  For every device exactly one worker answers 200 (the one holding its partition, with the
partition its readings really came from and a forecast equal to its last prediction's, the readings being 1 s
apart), and the other answers 404 naming that same partition and "owned by another worker".  The port is bound to
127.0.0.1 and a query token is set: without it the path is 401 while ``/metrics`` and ``/readyz`` answer as
before; an instant before the last reading is 400.
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
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from tests.integration.conftest import PARTITIONS, Topics, drain, finish, run_cmd, spawn

pytestmark = pytest.mark.integration

PORT_LINE = re.compile(r"serving /metrics, /healthz, /readyz on 127\.0\.0\.1:(\d+)")
TOKEN = "it-query-token-5d1e"  # noqa: S105 - a test value
DEVICES = [f"dev-{i}" for i in range(8)]
READINGS = 30  # per device, 1 s apart
WAIT_S = 90.0


def _get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - the local worker
            code, body = int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as ex:
        code, body = ex.code, ex.read().decode()
    return code, json.loads(body) if body.startswith("{") else body


def _until(what: str, check: Callable[[], bool], procs: list[subprocess.Popen[str]], logs: list[Path]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, f"worker exited ({proc.returncode}) waiting for {what}:\n" \
                                        f"{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT_S} s:\n{logs[0].read_text()[-3000:]}"
        time.sleep(0.3)


def _port(log: Path) -> int | None:
    found = PORT_LINE.search(log.read_text())
    return int(found.group(1)) if found else None


def test_each_device_is_answered_by_the_worker_holding_its_partition(
        kafka_bootstrap: str, topics: Topics, trained_model: Path, tmp_path: Path,
        processes: list[subprocess.Popen[str]], group: str) -> None:
    env = {"LIQUIDSTREAM_QUERY_TOKEN": TOKEN, "LIQUIDSTREAM_LOG_FORMAT": "json"}
    logs = [tmp_path / f"worker-{w}.log" for w in "ab"]
    workers = [spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--worker-id", f"q-{w}",
                             "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--exit-when-idle", "120"),
                     log, processes, env=env) for w, log in zip("ab", logs, strict=True)]
    _until("both ops ports", lambda: all(_port(log) for log in logs), workers, logs)
    ports = [_port(log) or 0 for log in logs]

    base = time.time_ns() // 1_000_000 - 120_000  # two minutes ago, epoch ms
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})  # default partitioner
    for i in range(READINGS):
        for d in DEVICES:
            value = {"device_id": d, "ts": base + 1000 * i, "values": [1.0 + 0.1 * ((i + len(d)) % 5)] * 4}
            producer.produce(topics.input, json.dumps(value).encode(), d.encode())
    assert producer.flush(30) == 0

    def answered() -> bool:  # every device held by exactly one worker, both workers holding some
        codes = [[_get(p, f"/devices/{d}")[0] for p in ports] for d in DEVICES]
        return all(sorted(c) == [200, 404] for c in codes) and {c.index(200) for c in codes} == {0, 1}

    _until("every device answered by exactly one worker", answered, workers, logs)
    _until("every reading predicted", lambda: len(drain(kafka_bootstrap, topics.predictions)) == 8 * READINGS,
           workers, logs)
    last = {}  # device -> its last prediction (1 s gaps: its horizon is 1 s)
    for rec in drain(kafka_bootstrap, topics.predictions):
        doc = rec.json()
        if doc["ts"] == base + 1000 * (READINGS - 1):
            last[doc["device_id"]] = doc
    at = base + 1000 * READINGS
    for d in DEVICES:
        partition = last[d]["source"]["partition"]  # where librdkafka really put the device's readings
        answers = [_get(p, f"/devices/{d}?at={at}") for p in ports]
        (code, doc), (other_code, other) = sorted(answers, key=lambda a: a[0])
        assert code == 200 and other_code == 404, answers
        assert doc["partition"] == partition and doc["readings"] == READINGS and doc["gap_s"] == 1.0
        assert doc["last_reading_ts"] == base + 1000 * (READINGS - 1) and doc["alert"]["open"] is False
        assert doc["model_version"] == last[d]["model_version"]
        np.testing.assert_allclose(doc["forecast"], last[d]["forecast"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(doc["forecast_std"], last[d]["forecast_std"], rtol=1e-4, atol=1e-4)
        assert other["reason"] == (f"device {d!r} belongs to partition {topics.input}[{partition}] "
                                   "(consistent_random partitioner), owned by another worker")
    code, doc = _get(ports[0], "/devices/dev-0", token=None)
    assert code == 401 and "Bearer" in doc["reason"]
    assert _get(ports[0], "/metrics", token=None)[0] == 200 and _get(ports[1], "/readyz", token=None)[0] == 200
    holder = next(p for p in ports if _get(p, "/devices/dev-0")[0] == 200)
    code, doc = _get(holder, f"/devices/dev-0?at={base}")
    assert code == 400 and "is before its last reading" in doc["reason"]

    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w, log in zip(workers, logs, strict=True):
        rc, _ = finish(w, log, 60)
        assert rc == 0, log.read_text()[-3000:]
    assert TOKEN not in "".join(log.read_text() for log in logs)


@pytest.mark.parametrize("partitioner", ["consistent_random", "murmur2_random"])
def test_the_partition_named_is_where_librdkafka_puts_the_key(kafka_bootstrap: str, topics: Topics,
                                                               partitioner: str) -> None:
    """The worker's own hash agrees with the client's partitioners (the Java-compatible murmur2 included)."""
    from liquidstream.pipeline.kafka.ownership import partition_for

    placed: dict[bytes, int] = {}
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": partitioner})
    keys = [f"dev-{i}".encode() for i in range(40)] + ["pump/7 ü".encode(), b"x" * 300]
    for key in keys:
        producer.produce(topics.input, b"{}", key,
                         on_delivery=lambda err, msg: placed.__setitem__(msg.key(), msg.partition()) if err is None
                         else None)
    assert producer.flush(30) == 0
    assert placed == {k: partition_for(k, PARTITIONS, partitioner) for k in keys}
