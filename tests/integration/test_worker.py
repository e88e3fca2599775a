"""``liquidstream simulate`` and ``liquidstream run`` as subprocesses against a real Apache Kafka broker.

(a) a full run: every input message gets exactly one output (a prediction for each valid reading, a dead
letter with the right class for each injected fault), alerts find the injected incidents, the worker exits 0
once idle with balanced stats.  (b) SIGTERM mid-stream, then a restart in the same group: at-least-once,
so every valid reading has at least one prediction and nothing is missing from the dead-letter topic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.dlq import HEADER_CLASS, HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC, parse_dead_letter_headers
from pipeline.incident_eval import score_incidents
from pipeline.simulate_kafka import FAULT_HEADER, FAULT_REASONS, MALFORMED_KINDS

if TYPE_CHECKING:  # conftest is not an importable module at run time; the Protocol is for type checkers
    from tests.conftest import MakeTopic

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
DRAIN_DEADLINE_S = 60.0  # seconds to read a topic to its end
RUN_TIMEOUT_S = 150.0  # seconds a worker run may take before the test gives up on it
Coord = tuple[int, int]  # (partition, offset) in the input topic


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
def processes() -> Any:
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


def drain(bootstrap: str, topic: str) -> list[Rec]:
    """Every record of ``topic`` up to its current end (high watermarks), read by a fresh consumer."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"drain-{uuid.uuid4().hex[:12]}",
                         "enable.auto.commit": False})
    try:
        high = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(PARTITIONS)}
        todo = {p for p, h in high.items() if h > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(todo)])
        out: list[Rec] = []
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        while todo:
            if time.monotonic() > deadline:
                pytest.fail(f"{topic}: read {len(out)} records, partitions {sorted(todo)} unfinished")
            for m in consumer.consume(num_messages=5000, timeout=0.5):
                assert m.error() is None, m.error()
                p, o = m.partition(), m.offset()
                assert p is not None and o is not None
                out.append(Rec(p, o, m.key(), m.value(), _headers(m.headers())))
                if o >= high[p] - 1:
                    todo.discard(p)
        return out
    finally:
        consumer.close()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def spawn(cmd: list[str], log: Path, started: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "LIQUIDSTREAM_LOG_LEVEL": "INFO"}
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
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


# -------------------------------------------------------------------------------------------- (a)
def test_worker_processes_every_message_exactly_once(kafka_bootstrap: str, topics: Topics, trained_model: Path,
                                                     tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    t0 = time.monotonic()
    sim = spawn(simulate_cmd(kafka_bootstrap, topics, tmp_path, "--devices", "100", "--events", "20000",
                             "--malformed", "225", "--duplicates", "20", "--late", "20", "--anomaly-rate", "30",
                             "--seed", "11"), tmp_path / "simulate.log", processes)
    rc, summary = finish(sim, tmp_path / "simulate.log")
    assert rc == 0 and summary["messages"] == 20_265
    inputs = {(r.partition, r.offset): r for r in drain(kafka_bootstrap, topics.input)}
    assert len(inputs) == 20_265
    faults = {c: r.fault for c, r in inputs.items() if r.fault is not None}
    assert set(Counter(faults.values())) == set(FAULT_REASONS)  # every malformed kind, late, duplicate
    valid = set(inputs) - set(faults)

    # Batches of <= 2000 never hold a partition's first and last tenth together, so the injected late
    # readings are always behind their device's clock (late), never merely reordered within a batch.
    log = tmp_path / "worker.log"
    worker = spawn(run_cmd(kafka_bootstrap, topics, f"it-{uuid.uuid4().hex[:8]}", trained_model,
                           "--exit-when-idle", "5", "--batch-max-messages", "2000"), log, processes)
    rc, stats = finish(worker, log)
    print(f"\nworker final stats: {json.dumps(stats)}")
    assert rc == 0, log.read_text()[-4000:]
    assert stats["balanced"] and stats["consumed"] == stats["predictions"] + stats["dead_letters"]
    assert (stats["consumed"], stats["predictions"], stats["dead_letters"]) == (20_265, 20_000, 265)
    assert (stats["late"], stats["duplicates"]) == (20, 20)

    preds = drain(kafka_bootstrap, topics.predictions)
    dlq = drain(kafka_bootstrap, topics.dlq)
    alerts = [r.json() | {"key": r.key} for r in drain(kafka_bootstrap, topics.alerts)]
    assert len(preds) == 20_000 and len(dlq) == 265 and len(alerts) == stats["alerts"]

    pred_src = Counter((p.json()["source"]["partition"], p.json()["source"]["offset"]) for p in preds)
    assert set(pred_src) == valid and max(pred_src.values()) == 1, "a gap or a duplicate among predictions"
    for p in preds:
        rec = p.json()
        src = inputs[(rec["source"]["partition"], rec["source"]["offset"])].json()
        assert (rec["device_id"], rec["ts"], p.key) == (src["device_id"], src["ts"], src["device_id"].encode())
        assert rec["source"]["topic"] == topics.input and len(rec["forecast"]) == 4
    assert dlq_sources(dlq, topics.input) == Counter(set(faults)), "a fault missing or doubled on the DLQ"
    check_dead_letters(dlq, inputs, topics.input)
    assert {r.fault for r in dlq} >= set(MALFORMED_KINDS)

    for a in alerts:  # an alert is raised by a valid reading of its own device
        src = inputs[(a["source"]["partition"], a["source"]["offset"])].json()
        assert (a["device_id"], a["ts"], a["key"]) == (src["device_id"], src["ts"], src["device_id"].encode())
    truth = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    score = score_incidents(((a["device_id"], a["ts"]) for a in alerts),
                            ((i["device_id"], i["kind"], i["start_ms"], i["end_ms"]) for i in truth))
    print(f"alerts vs injected incidents: {json.dumps(score.as_dict())}; "
          f"worker {stats['events_per_s']} events/s; test {time.monotonic() - t0:.1f} s")
    assert score.incidents >= 20 and score.recall >= 0.5 and score.true_alerts >= 1


# -------------------------------------------------------------------------------------------- (b)
def test_sigterm_mid_stream_then_restart_loses_nothing(kafka_bootstrap: str, topics: Topics, trained_model: Path,
                                                       tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    group = f"it-restart-{uuid.uuid4().hex[:8]}"
    sim = spawn(simulate_cmd(kafka_bootstrap, topics, tmp_path, "--devices", "100", "--events", "12000",
                             "--malformed", "120", "--rate", "2000", "--anomaly-rate", "10", "--seed", "5"),
                tmp_path / "simulate.log", processes)
    log1 = tmp_path / "worker-1.log"
    first = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "60",
                          "--batch-max-messages", "500"), log1, processes)
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + 90
        while committed_total(probe, topics.input) < 3000:  # mid-stream: a few batches are committed
            assert first.poll() is None, f"worker exited early:\n{log1.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no progress:\n{log1.read_text()[-4000:]}"
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        rc1, stats1 = finish(first, log1, 60)
        done_by_first = committed_total(probe, topics.input)
        rc, summary = finish(sim, tmp_path / "simulate.log")
        assert rc == 0
        total = summary["messages"]
        print(f"\nfirst run (SIGTERM): {json.dumps(stats1)}; committed {done_by_first}/{total}")
        assert rc1 == 0, log1.read_text()[-4000:]
        assert "signal 15" in log1.read_text() and stats1["balanced"]
        assert stats1["consumed"] == done_by_first < total  # finished its batch, committed, stopped

        log2 = tmp_path / "worker-2.log"
        second = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "5"), log2,
                       processes)
        rc2, stats2 = finish(second, log2)
        print(f"second run: {json.dumps(stats2)}")
        assert rc2 == 0 and stats2["balanced"], log2.read_text()[-4000:]
        assert committed_total(probe, topics.input) == total
        assert stats1["consumed"] + stats2["consumed"] >= total
    finally:
        probe.close()

    inputs = {(r.partition, r.offset): r for r in drain(kafka_bootstrap, topics.input)}
    assert len(inputs) == total
    faults = {c for c, r in inputs.items() if r.fault is not None}
    assert len(faults) == 120
    pred_src = Counter((p.json()["source"]["partition"], p.json()["source"]["offset"])
                       for p in drain(kafka_bootstrap, topics.predictions))
    assert set(pred_src) == set(inputs) - faults, "a valid reading without prediction (or a fault with one)"
    dlq = drain(kafka_bootstrap, topics.dlq)
    assert set(dlq_sources(dlq, topics.input)) == faults
    check_dead_letters(dlq, inputs, topics.input)
