"""Several models in one worker on a real broker: two input topics, a 2-channel model and a 3-channel one (the
second topic in the wide shape), one `liquidstream run --models` process.  Every valid reading of each topic gets
exactly one prediction from its own model; a reading shaped for the other model is a dead letter."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer

from liquidstream.operators import Forecaster
from liquidstream.operators.model_io import save_model
from liquidstream.pipeline.wire.contract import PredictionRecord
from tests.conftest import MakeTopic
from tests.integration.conftest import Topics, cli, drain, finish, spawn

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000
N = 300  # readings per topic


def _produce(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in values:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def test_two_models_in_one_worker(kafka_bootstrap: str, topics: Topics, make_topic: MakeTopic, tmp_path: Path,
                                  processes: list[subprocess.Popen[str]], group: str) -> None:
    line_b = make_topic(2, prefix="line-b")
    two, three = tmp_path / "two.pt", tmp_path / "three.pt"
    v2 = save_model(Forecaster(n_channels=2, hidden_size=4), two)
    v3 = save_model(Forecaster(n_channels=3, hidden_size=4), three)
    a = [(f"a{k % 5}".encode(), json.dumps({"device_id": f"a{k % 5}", "ts": T0 + 1000 * k,
                                             "values": [1.0, 0.1 * k]}).encode()) for k in range(N)]
    a.append((b"a0", json.dumps({"device_id": "a0", "ts": T0 + 10**6, "values": [1.0, 2.0, 3.0]}).encode()))
    b = [(f"b{k % 4}".encode(), json.dumps({"sensor": f"b{k % 4}", "time": (T0 + 1000 * k) / 1000, "t": 20.0,
                                             "p": 1.0 + k % 3, "v": 0.5}).encode()) for k in range(N)]
    _produce(kafka_bootstrap, topics.input, a)
    _produce(kafka_bootstrap, line_b, b)
    mapping = {line_b: {"shape": "wide", "device_field": "sensor", "time_field": "time", "time_unit": "s",
                        "channel_fields": ["t", "p", "v"]}}
    log = tmp_path / "worker.log"
    cmd = cli("run", "--bootstrap", kafka_bootstrap, "--models", f"{topics.input}={two},{line_b}={three}",
              "--predictions-topic", topics.predictions, "--alerts-topic", topics.alerts, "--dlq-topic", topics.dlq,
              "--group-id", group, "--device", "cpu", "--exit-when-idle", "10")
    worker = spawn(cmd, log, processes, env={"LIQUIDSTREAM_MAPPINGS": json.dumps(mapping)})
    rc, last = finish(worker, log)
    assert rc == 0, log.read_text()[-4000:]
    assert last["final"] and last["exit_code"] == 0
    preds = [PredictionRecord.model_validate_json(r.value or b"") for r in drain(kafka_bootstrap, topics.predictions)]
    by_topic = Counter((p.source.model_dump()["topic"], p.model_version, len(p.forecast)) for p in preds)
    assert by_topic == Counter({(topics.input, v2, 2): N, (line_b, v3, 3): N})
    sources = Counter(tuple(p.source.model_dump().values()) for p in preds)
    assert len(sources) == 2 * N and max(sources.values()) == 1  # exactly one prediction per reading
    dlq = drain(kafka_bootstrap, topics.dlq)
    assert [r.headers["ls.error.class"] for r in dlq] == ["wrong_length"]
