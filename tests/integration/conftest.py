"""Fixtures and helpers for the worker's integration tests: a small trained model (saved once per session),
the four topics of a run, worker subprocesses, and readers of the output topics.

The broker fixtures (``kafka_bootstrap``, ``kafka_admin``, ``make_topic``) live in ``tests/conftest.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from liquidstream.pipeline.offline.fleet_messages import FAULT_HEADER, FAULT_REASONS
from liquidstream.pipeline.wire.dead_letters import (
    HEADER_CLASS,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    parse_dead_letter_headers,
)

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

    from tests.conftest import MakeTopic

#: Training data for the session model: a fleet separate from (other seed than) every test stream.
TRAIN_DEVICES = 64
TRAIN_DURATION_S = 300.0  # simulated seconds per device
TRAIN_SEED = 99


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.pt`` of a tiny CfC forecaster trained for two epochs on incident-free simulated readings.

    A few seconds on two cores; good enough that the worker's alerts find most injected incidents.
    """
    import torch

    from liquidstream.operators.model_io import save_model
    from liquidstream.pipeline.offline.demo import DemoConfig, train_model
    from liquidstream.pipeline.offline.simulator import simulate
    from liquidstream.pipeline.settings import Settings

    stream = simulate(n_devices=TRAIN_DEVICES, duration_s=TRAIN_DURATION_S, seed=TRAIN_SEED, anomaly_rate=0.0)
    cfg = DemoConfig(hidden_size=16, epochs=2, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only add contention on a busy host
    try:
        model, _ = train_model(stream, cfg, Settings(device="cpu"), show=False)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(model, path, {"trained_on": "integration-test simulator", "seed": TRAIN_SEED})
    return path


# ------------------------------------------------------------------------------------------- shared helpers
# Used by test_worker.py and test_exactly_once.py (``from tests.integration.conftest import ...``).
REPO_ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
T = TypeVar("T")
DRAIN_DEADLINE_S = 60.0  # seconds to read a topic to its end
RUN_TIMEOUT_S = 150.0  # seconds a worker run may take before the test gives up on it
Coord = tuple[int, int]  # (partition, offset) in the input topic
#: Client settings for worker subprocesses in tests: a SIGKILLed member leaves the group after 6 s (the
#: broker's minimum session timeout) instead of librdkafka's default 45 s.
FAST_GROUP_CONFIG = json.dumps({"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"})


@dataclass(frozen=True)
class Rec:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]  # ls.* headers and the simulator's sim.fault, as text

    @property
    def fault(self) -> str | None:
        return self.headers.get(FAULT_HEADER)

    def json(self) -> Any:
        assert self.value is not None
        return json.loads(self.value)


@dataclass(frozen=True)
class Topics:
    input: str
    predictions: str
    alerts: str
    dlq: str


@pytest.fixture
def topics(make_topic: MakeTopic) -> Topics:
    return Topics(*(make_topic(PARTITIONS, prefix=p) for p in ("readings", "predictions", "alerts", "dlq")))


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Subprocesses started by a test; any still running at teardown is killed (nothing outlives a test)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _headers(raw: Any) -> dict[str, str]:
    parsed = parse_dead_letter_headers(raw)
    for name, value in raw or ():
        if name == FAULT_HEADER and isinstance(value, bytes):
            parsed[name] = value.decode()
    return parsed


def drain_messages(bootstrap: str, topic: str, convert: Callable[[Message], T], *,
                   committed_only: bool = True, partitions: int = PARTITIONS) -> list[T]:
    """``convert`` of every record of ``topic`` up to its current end, read by a fresh consumer
    (``read_committed`` unless ``committed_only`` is False).  Ends on end-of-partition events: with
    transactions the last offsets of a partition are commit/abort markers, never delivered as messages."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"drain-{uuid.uuid4().hex[:12]}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": "read_committed" if committed_only else "read_uncommitted"})
    try:
        high = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)}
        todo = {p for p, h in high.items() if h > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(todo)])
        out: list[T] = []
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        while todo:
            if time.monotonic() > deadline:
                pytest.fail(f"{topic}: read {len(out)} records, partitions {sorted(todo)} unfinished")
            for m in consumer.consume(num_messages=5000, timeout=0.5):
                p, o, err = m.partition(), m.offset(), m.error()
                assert p is not None and o is not None
                if err is not None:
                    assert err.code() == KafkaError._PARTITION_EOF, err
                    if o >= high[p]:
                        todo.discard(p)
                    continue
                out.append(convert(m))
        return out
    finally:
        consumer.close()


def drain(bootstrap: str, topic: str, *, committed_only: bool = True) -> list[Rec]:
    """Every record of ``topic`` (:func:`drain_messages`) as a :class:`Rec`, its headers parsed."""
    return drain_messages(bootstrap, topic, lambda m: Rec(m.partition() or 0, m.offset() or 0, m.key(), m.value(),
                                                          _headers(m.headers())), committed_only=committed_only)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "liquidstream.pipeline.cli.entry", *args]


def spawn(cmd: list[str], log: Path, started: list[subprocess.Popen[str]],
          env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "LIQUIDSTREAM_LOG_LEVEL": "INFO",
                               "LIQUIDSTREAM_METRICS_PORT": "0"} | (env or {})
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=err, text=True)
    started.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], log: Path, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """Exit code and last stdout line (a JSON summary) of a subprocess."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args!r} still running after {timeout_s} s; log:\n{log.read_text()[-4000:]}")
    lines = out.strip().splitlines()
    if not lines:
        pytest.fail(f"{proc.args!r} exited {proc.returncode} without a summary; log:\n{log.read_text()[-4000:]}")
    return proc.returncode, json.loads(lines[-1])


def simulate_cmd(bootstrap: str, topics: Topics, tmp: Path, *extra: str) -> list[str]:
    return cli("simulate", "--bootstrap", bootstrap, "--topic", topics.input, "--truth", str(tmp / "truth.jsonl"),
               *extra)


def run_cmd(bootstrap: str, topics: Topics, group: str, model: Path, *extra: str) -> list[str]:
    return cli("run", "--bootstrap", bootstrap, "--input-topic", topics.input, "--predictions-topic",
               topics.predictions, "--alerts-topic", topics.alerts, "--dlq-topic", topics.dlq, "--group-id", group,
               "--model", str(model), "--device", "cpu", *extra)


def committed_total(consumer: Consumer, topic: str) -> int:
    """Sum over partitions of the group's committed offsets (= input messages it has finished)."""
    tps = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
    return sum(max(tp.offset, 0) for tp in tps)


def dlq_sources(dlq: list[Rec], topic: str) -> Counter[Coord]:
    assert all(r.headers[HEADER_TOPIC] == topic for r in dlq)
    return Counter((int(r.headers[HEADER_PARTITION]), int(r.headers[HEADER_OFFSET])) for r in dlq)


def check_dead_letters(dlq: list[Rec], inputs: dict[Coord, Rec], topic: str) -> None:
    """Each dead letter is its input message, bytes and key intact, with the class its fault calls for."""
    for r in dlq:
        src = inputs[(int(r.headers[HEADER_PARTITION]), int(r.headers[HEADER_OFFSET]))]
        assert src.fault is not None, f"valid reading {src} dead-lettered: {r.headers}"
        assert r.headers[HEADER_CLASS] == FAULT_REASONS[src.fault].value, (src.fault, r.headers)
        assert (r.key, r.value, r.fault) == (src.key, src.value, src.fault)


def pred_sources(preds: list[Rec]) -> Counter[Coord]:
    """How many predictions each input (partition, offset) has."""
    return Counter((p.json()["source"]["partition"], p.json()["source"]["offset"]) for p in preds)


@pytest.fixture
def group(kafka_admin: AdminClient) -> Iterator[str]:
    """A fresh consumer group id; the state changelog the worker creates for it is deleted at teardown
    (best effort: it matters only on a long-lived broker)."""
    name = f"it-{uuid.uuid4().hex[:10]}"
    yield name
    futures = kafka_admin.delete_topics([f"{name}-state-changelog"], operation_timeout=10)
    concurrent.futures.wait(list(futures.values()), timeout=30)
