"""The faust-streaming app (``python -m liquidstream.pipeline.faust.app worker``) against a real broker.

Readings of a simulated fleet plus malformed messages go to a fresh input topic in two halves.  The app runs as a
subprocess over the first half, is stopped with SIGTERM, and a *second* process serves the rest, so its devices must
come back from the faust table's changelog.  The predictions must be exactly what ``LiquidOperator.process`` plus
:func:`liquidstream.pipeline.wire.records.prediction_records` give over all readings in one go (the same weights, loaded
in the test), one per valid reading (by source offset), and every malformed message must be in the dead-letter topic
with the reason the codec gives its kind.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from liquidstream.operators import Forecaster, LiquidOperator
from liquidstream.operators.model_io import load_model, save_model
from liquidstream.pipeline.offline.fleet_messages import FAULT_HEADER, MALFORMED_KINDS, SimMessage, malformed_messages
from liquidstream.pipeline.offline.simulator import SimulatedStream, simulate
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.dead_letters import (
    HEADER_CLASS,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    parse_dead_letter_headers,
)
from liquidstream.pipeline.wire.records import alert_records, prediction_records

if TYPE_CHECKING:
    from tests.conftest import MakeTopic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICES = 10
DURATION_S = 90.0  # simulated seconds: about 1,100 readings (devices send 0.5-2 readings a second)
MALFORMED_PER_HALF = 15  # one of every malformed kind in each half
PARTITIONS = 4
RUN_DEADLINE_S = 90.0  # per app run: start-up (imports, group join, table recovery) plus processing
STOP_TIMEOUT_S = 30.0
TOL = 1e-4


def _save_model(path: Path) -> Path:
    torch.manual_seed(7)  # untrained but fixed weights: the test and the app load the same bytes
    save_model(Forecaster(n_channels=4, hidden_size=16, cell="cfc"), path)
    return path


def _reading_messages(stream: SimulatedStream) -> list[SimMessage]:
    return [SimMessage(r["device_id"].encode(), json.dumps(r, separators=(",", ":")).encode())
            for r in stream.records()]


def _interleave(valid: list[SimMessage], bad: list[SimMessage], seed: int) -> list[SimMessage]:
    """``bad`` at random positions among ``valid`` (whose order is kept)."""
    slots = sorted(np.random.default_rng(seed).choice(len(valid) + len(bad), len(bad), replace=False).tolist())
    out, it_valid, it_bad = [], iter(valid), iter(bad)
    for i in range(len(valid) + len(bad)):
        out.append(next(it_bad) if slots and i == slots[0] else next(it_valid))
        if slots and i == slots[0]:
            slots.pop(0)
    return out


def _produce(bootstrap: str, topic: str, messages: list[SimMessage]) -> list[tuple[int, int]]:
    """Send in order (idempotent producer: no reordering); returns each message's (partition, offset)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    coords: list[tuple[int, int] | None] = [None] * len(messages)

    def delivered(i: int) -> Any:
        def callback(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                raise KafkaException(err)
            partition, offset = msg.partition(), msg.offset()
            assert partition is not None and offset is not None
            coords[i] = (partition, offset)
        return callback

    for i, m in enumerate(messages):
        producer.produce(topic, key=m.key, value=m.value, headers=m.headers(), on_delivery=delivered(i))
        producer.poll(0)
    assert producer.flush(30) == 0, "input messages not delivered"
    assert all(c is not None for c in coords)
    return [c for c in coords if c is not None]


class Collector:
    """Reads the output topics from the beginning, across both app runs."""

    def __init__(self, bootstrap: str, predictions: str, alerts: str, dlq: str) -> None:
        self.topics = predictions, alerts, dlq
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"it-faust-{uuid.uuid4().hex[:8]}",
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.consumer.subscribe(list(self.topics))
        self.records: dict[str, list[Message]] = {t: [] for t in self.topics}
        self.predicted: set[tuple[int, int]] = set()  # source coordinates with a prediction
        self.lettered: set[tuple[int, int]] = set()  # source coordinates with a dead letter

    def poll(self, seconds: float) -> None:
        for msg in self.consumer.consume(num_messages=1000, timeout=seconds):
            err = msg.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(err)
            if err is not None:
                continue
            topic = msg.topic() or "?"
            self.records[topic].append(msg)
            if topic == self.topics[0]:
                self.predicted.add(_where(json.loads(msg.value() or b"")))
            elif topic == self.topics[2]:
                hdr = parse_dead_letter_headers(_headers(msg))
                self.lettered.add((int(hdr[HEADER_PARTITION]), int(hdr[HEADER_OFFSET])))

    def close(self) -> None:
        self.consumer.close()


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@pytest.fixture
def run_app(tmp_path: Path) -> Iterator[Any]:
    """Start the app as a subprocess; every process started is stopped (SIGTERM, then SIGKILL) at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(env_settings: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        env = os.environ | env_settings | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as fh:  # the child keeps its own descriptor
            proc = subprocess.Popen([sys.executable, "-m", "liquidstream.pipeline.faust.app", "worker", "-l", "info"],
                                    cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, log

    yield start
    for proc in procs:
        _stop(proc)


def _wait_for(collector: Collector, proc: subprocess.Popen[bytes], log: Path, valid: set[tuple[int, int]],
              malformed: set[tuple[int, int]], committed: Callable[[], list[int]]) -> float:
    """Seconds until every valid reading has a prediction and every malformed message a dead letter."""
    started = time.monotonic()
    while not (valid <= collector.predicted and malformed <= collector.lettered):
        if proc.poll() is not None:
            pytest.fail(f"faust app exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() - started > RUN_DEADLINE_S:
            missing = sorted((valid - collector.predicted) | (malformed - collector.lettered))
            pytest.fail(f"{len(valid & collector.predicted)}/{len(valid)} predictions, "
                        f"{len(malformed & collector.lettered)}/{len(malformed)} dead letters after "
                        f"{RUN_DEADLINE_S} s; missing (partition, offset): {missing}; the app's committed "
                        f"offsets: {committed()}\n{log.read_text()[-4000:]}")
        collector.poll(0.5)
    return time.monotonic() - started


def _committed(bootstrap: str, group: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return [tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], 10)]
    finally:
        consumer.close()


def _headers(msg: Message) -> list[tuple[str, bytes | str | None]]:
    headers = msg.headers() or []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def _where(rec: dict[str, Any]) -> tuple[int, int]:
    return rec["source"]["partition"], rec["source"]["offset"]


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=TOL, abs_tol=TOL)


def test_faust_app_matches_operator_and_recovers_state(kafka_bootstrap: str, make_topic: MakeTopic,
                                                      tmp_path: Path, run_app: Any) -> None:
    source, predictions, alerts, dlq = (make_topic(PARTITIONS, prefix=p) for p in ("in", "pred", "alert", "dlq"))
    model_path = _save_model(tmp_path / "model.pt")
    env = {"LIQUIDSTREAM_BOOTSTRAP": kafka_bootstrap, "LIQUIDSTREAM_INPUT_TOPIC": source,
           "LIQUIDSTREAM_PREDICTIONS_TOPIC": predictions, "LIQUIDSTREAM_ALERTS_TOPIC": alerts,
           "LIQUIDSTREAM_DLQ_TOPIC": dlq, "LIQUIDSTREAM_GROUP_ID": f"it-{uuid.uuid4().hex[:8]}",
           "LIQUIDSTREAM_MODEL": str(model_path), "LIQUIDSTREAM_DEVICE": "cpu",
           "LIQUIDSTREAM_BATCH_MAX_MESSAGES": "64", "LIQUIDSTREAM_BATCH_MAX_MS": "50",
           "LIQUIDSTREAM_GUARANTEE": "at_least_once"}

    # incidents from 30 s on, frequent enough that this seed opens a few alerts (two stuck sensors) in the short run
    stream = simulate(n_devices=DEVICES, duration_s=DURATION_S, seed=4, anomaly_rate=120.0, normal_prefix_s=30.0)
    first, second = stream.split_by_time(0.5)
    device_ids = [str(d) for d in np.unique(stream.device_ids)]
    now_ms = time.time_ns() // 1_000_000
    halves = [_interleave(_reading_messages(part), malformed_messages(MALFORMED_PER_HALF, device_ids, n_channels=4,
                                                                      now_ms=now_ms, seed=k), seed=k)
              for k, part in enumerate((first, second))]
    collector = Collector(kafka_bootstrap, predictions, alerts, dlq)
    sent: list[tuple[SimMessage, tuple[int, int]]] = []
    try:
        for k, messages in enumerate(halves):
            sent += zip(messages, _produce(kafka_bootstrap, source, messages), strict=True)
            valid_coords = {c for m, c in sent if m.fault is None}
            proc, log = run_app(env, f"run{k}")
            took = _wait_for(collector, proc, log, valid_coords, {c for m, c in sent if m.fault is not None},
                             lambda: _committed(kafka_bootstrap, env["LIQUIDSTREAM_GROUP_ID"] + "-faust", source))
            code = _stop(proc)
            print(f"run {k}: {len(valid_coords)} predictions after {took:.1f} s (start-up included); exit {code}")
            assert code == 0, log.read_text()[-4000:]
        collector.poll(2.0)  # anything extra (a duplicate) that arrived late
    finally:
        collector.close()
    assert "restored" in (tmp_path / "run1.log").read_text(), "second run did not restore devices from the table"

    # Reference: the same weights over every valid reading in one call, in stream order.
    model, doc = load_model(model_path)
    operator = LiquidOperator(model, Settings().operator, model_version=str(doc["version"]))
    valid = [(json.loads(m.value or b""), c) for m, c in sent if m.fault is None]
    ids, sources = [r["device_id"] for r, _ in valid], [(source, p, o) for _, (p, o) in valid]
    result = operator.process(ids, np.array([r["ts"] for r, _ in valid]),
                              np.array([r["values"] for r, _ in valid], dtype=np.float32))
    expected = {_where(rec): rec for _, rec in prediction_records(ids, result, operator.model_version, sources)}
    expected_alerts = {_where(rec): rec for _, rec in alert_records(result, operator.model_version, sources)}

    got: dict[tuple[int, int], dict[str, Any]] = {}
    for msg in collector.records[predictions]:
        rec = json.loads(msg.value() or b"")
        assert _where(rec) not in got, f"two predictions for input {_where(rec)}"
        got[_where(rec)] = rec
        key = msg.key() or b""
        assert key == rec["device_id"].encode(), "predictions are keyed by device id"
        assert msg.partition() == zlib.crc32(key) % PARTITIONS, "outputs partitioned like librdkafka's default"
    assert got.keys() == expected.keys()
    inexact = ("forecast", "forecast_std", "score", "anomaly_score", "threshold")
    for where, want in expected.items():
        have = got[where]
        assert have.keys() == want.keys()
        assert {k: have[k] for k in want if k not in inexact} == {k: v for k, v in want.items() if k not in inexact}
        for field in ("forecast", "forecast_std"):
            assert all(_close(a, b) for a, b in zip(have[field], want[field], strict=True)), (where, field)
        for field in ("score", "threshold"):
            assert _close(have[field], want[field]), (where, field, have[field], want[field])

    got_alerts: dict[tuple[int, int], dict[str, Any]] = {}
    for msg in collector.records[alerts]:
        rec = json.loads(msg.value() or b"")
        assert _where(rec) not in got_alerts, f"two alerts for input {_where(rec)}"
        got_alerts[_where(rec)] = rec
    assert expected_alerts, "the stream should open alerts, or the alert path goes untested"
    assert got_alerts.keys() == expected_alerts.keys()
    def exact(rec: dict[str, Any]) -> dict[str, Any]:
        """The fields that do not depend on batching: the explanation's time constants are the cell's at the end
        of the batch that opened the alert (operators/explain.py), and the faust app batches differently."""
        out = {k: v for k, v in rec.items() if k not in inexact}
        if "explanation" in out:
            out["explanation"] = {k: v for k, v in out["explanation"].items() if k != "time_constants_s"}
        return out

    for where, want in expected_alerts.items():
        assert exact(got_alerts[where]) == exact(want)
        assert _close(got_alerts[where]["score"], want["score"]), where

    # Dead letters: every malformed message, with the codec's class for its kind and the original bytes.
    # A reading delivered twice (at-least-once: a replay after a restart or rebalance) finds its device's
    # state already past it, so the operator drops it as late/duplicate: a dead letter, never a second
    # prediction.  Those are allowed, but only for readings that have their one prediction.
    by_coords = {c: m for m, c in sent}
    replays = 0
    for msg in collector.records[dlq]:
        headers = _headers(msg)
        hdr = parse_dead_letter_headers(headers)
        where = (int(hdr[HEADER_PARTITION]), int(hdr[HEADER_OFFSET]))
        original = by_coords[where]
        assert hdr[HEADER_REASON], "every dead letter says why"
        assert (msg.key(), msg.value()) == (original.key, original.value), "dead letter keeps the original"
        if original.fault is None:
            assert hdr[HEADER_CLASS] in ("late", "duplicate") and where in got, f"valid reading dead-lettered: {hdr}"
            replays += 1
            continue
        assert hdr[HEADER_CLASS] == MALFORMED_KINDS[original.fault].value, (original.fault, hdr)
        assert (FAULT_HEADER, original.fault.encode()) in headers, "input headers are forwarded"
    assert collector.lettered >= {c for m, c in sent if m.fault is not None}
    print(f"{len(got)} predictions, {len(got_alerts)} alerts, {len(collector.records[dlq])} dead letters "
          f"({replays} of them replayed readings) match the operator run directly")


def test_offset_guard_orders_skips_and_repairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard against faust's dropped messages, with a fake consumer and broker (no Kafka needed)."""
    import asyncio
    from types import SimpleNamespace

    from faust.types import TP

    from liquidstream.pipeline.faust.offsets import OffsetGuard

    tp, seeks = TP("in", 0), list[tuple[TP, int]]()
    holes: dict[int, int | None] = {9: 10}  # offset 9: a transaction marker

    async def seek(partition: TP, offset: int) -> None:
        seeks.append((partition, offset))

    async def highwaters(*tps: TP) -> dict[TP, int]:
        return dict.fromkeys(tps, 20)

    consumer = SimpleNamespace(seek=seek, highwaters=highwaters, assignment=lambda: {tp})
    guard = OffsetGuard(SimpleNamespace(consumer=consumer, conf=SimpleNamespace(id="g")),  # type: ignore[arg-type]
                        Settings(input_topic="in"))
    # committed offset 5; the first record at or after an offset is the offset itself, except at holes
    monkeypatch.setattr(guard, "_probe", lambda _tp, offset: 5 if offset is None else holes.get(offset, offset))

    def sort(*offsets: int) -> tuple[list[int], list[int]]:
        events = [SimpleNamespace(message=SimpleNamespace(tp=tp, offset=o)) for o in offsets]
        ready, again = asyncio.run(guard.sort(events))  # type: ignore[arg-type]
        return [e.message.offset for e in ready], [e.message.offset for e in again]

    assert sort(5, 6, 4, 9, 10) == ([5, 6], [4])  # 4: a redelivery; 9: faust skipped 7-8, so 9 and 10 wait
    assert seeks == [(tp, 7)]
    assert sort(10, 7, 8, 10) == ([7, 8, 10], [])  # a leftover from before the seek waits; 9 is a real hole
    asyncio.run(guard.unstall())  # highwater 20 > expected 11: noted, no progress check yet
    assert seeks == [(tp, 7)]
    asyncio.run(guard.unstall())  # still at 11: stalled, sought back
    assert seeks == [(tp, 7), (tp, 11)]
    guard.expected[tp], holes[19] = 19, None  # offset 19 (the last): a transaction marker
    for _ in range(3):
        asyncio.run(guard.unstall())
    assert seeks == [(tp, 7), (tp, 11)] and guard.empty[tp] == (19, 20)  # probed once, never sought
    guard.forget({tp})
    assert sort(5) == ([5], [])  # after a revocation: from the committed offset again
