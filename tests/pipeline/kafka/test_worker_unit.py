"""Unit tests of the Kafka worker without a broker: the pure batch step (liquidstream.pipeline.kafka.batch_step), the
fault
generator (liquidstream.pipeline.offline.fleet_messages), client configs, and the consume/produce/flush/commit loop
(liquidstream.pipeline.kafka.worker.KafkaWorker) driven by fake clients."""

from __future__ import annotations

import errno
import json
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings, StepResult
from liquidstream.pipeline.cli import build_parser
from liquidstream.pipeline.cli.entry import _settings
from liquidstream.pipeline.errors import ConfigurationError, KafkaDeliveryError, PipelineError
from liquidstream.pipeline.kafka.batch_step import describe_range, handle_batch, offsets_to_commit
from liquidstream.pipeline.kafka.bookkeeping import DeviceRegistry, StateUndo, Stats
from liquidstream.pipeline.kafka.changelog import PROGRESS_KEY, Restored, StateLayout
from liquidstream.pipeline.kafka.output import BatchOutput, OutputTopics
from liquidstream.pipeline.kafka.transactions import DeliveryTracker, consumer_config, producer_config, transactional_id
from liquidstream.pipeline.kafka.worker import KafkaWorker
from liquidstream.pipeline.kafka.worker_ops import WorkerOps
from liquidstream.pipeline.offline.fleet_messages import (
    FAULT_HEADER,
    MALFORMED_KINDS,
    build_messages,
    fleet_stream,
    malformed_messages,
)
from liquidstream.pipeline.ops.server import OpsServer
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.codec import DecodeLimits, decode_batch
from liquidstream.pipeline.wire.dead_letters import parse_dead_letter_headers
from liquidstream.pipeline.wire.records import encode_predictions, prediction_records

NOW_MS = 1_800_000_000_000
TOPICS = OutputTopics("preds", "alerts", "dlq")
LIMITS = DecodeLimits(n_channels=2, max_payload_bytes=4096, ts_min_ms=0, max_future_ms=60_000)


def _operator() -> LiquidOperator:
    return LiquidOperator(Forecaster(n_channels=2, hidden_size=4, cell="cfc"), OperatorSettings(),
                          model_version="test")


def _msg(partition: int, offset: int, key: bytes | None, value: bytes | None, topic: str = "readings",
         headers: list[tuple[str, str | bytes | None]] | None = None) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=key, value=value, headers=headers)


def _reading(dev: str, ts: int, values: tuple[float, ...] = (1.0, 2.0)) -> bytes:
    return json.dumps({"device_id": dev, "ts": ts, "values": list(values)}).encode()


def _by_topic(out: BatchOutput) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for rec in out.records:
        grouped.setdefault(rec.topic, []).append(rec)
    return grouped


# ------------------------------------------------------------------------------------------- batch step
def test_batch_routes_every_message_exactly_once() -> None:
    msgs = [_msg(0, 10, b"a", _reading("a", NOW_MS - 3000)), _msg(1, 4, b"b", _reading("b", NOW_MS - 3000)),
            _msg(0, 11, b"a", b"{not json"), _msg(1, 5, b"b", _reading("b", NOW_MS - 2000, (1.5, 2.5))),
            _msg(0, 12, b"zz", _reading("a", NOW_MS - 1000), headers=[("trace", b"t-1")]),
            _msg(1, 7, None, None)]
    out = handle_batch(msgs, _operator(), TOPICS, LIMITS, NOW_MS, worker_id="w-1")
    grouped = _by_topic(out)
    assert out.consumed == 6 and out.predictions == 3 and sum(out.dead_letters.values()) == 3
    assert out.dead_letters == Counter({"malformed_json": 1, "key_mismatch": 1, "empty": 1})
    assert out.commits == {("readings", 0): 13, ("readings", 1): 8}
    preds = [json.loads(r.value) for r in grouped["preds"]]
    assert [(p["device_id"], p["source"]["partition"], p["source"]["offset"]) for p in preds] == \
        [("a", 0, 10), ("b", 1, 4), ("b", 1, 5)]
    assert [r.key for r in grouped["preds"]] == [b"a", b"b", b"b"]
    assert [p["status"] for p in preds] == ["first", "first", "ok"] and preds[2]["model_version"] == "test"
    dlq = {parse_dead_letter_headers(r.headers)["ls.source.offset"]: r for r in grouped["dlq"]}
    assert sorted(dlq) == ["11", "12", "7"]
    mismatch = dlq["12"]
    assert mismatch.key == b"zz" and mismatch.value == msgs[4].value()
    assert mismatch.headers[0] == ("trace", b"t-1")  # the original headers are forwarded first
    hdrs = parse_dead_letter_headers(mismatch.headers)
    assert hdrs["ls.error.class"] == "key_mismatch" and hdrs["ls.source.topic"] == "readings"
    assert hdrs["ls.source.partition"] == "0" and hdrs["ls.worker"] == "w-1"
    assert dlq["7"].key is None and dlq["7"].value is None
    assert out.device_partitions == {"a": ("readings", 0), "b": ("readings", 1)}
    assert out.event_ts_ms.tolist() == [NOW_MS - 3000, NOW_MS - 3000, NOW_MS - 2000] and out.late == 0


def test_late_and_duplicate_readings_go_to_the_dlq_with_their_original_bytes() -> None:
    op = _operator()
    first = [_msg(0, i, b"a", _reading("a", NOW_MS - 10_000 + 1000 * i)) for i in range(5)]
    handle_batch(first, op, TOPICS, LIMITS, NOW_MS)
    late, dup = _reading("a", NOW_MS - 9_500), _reading("a", NOW_MS - 6_000)
    out = handle_batch([_msg(0, 5, b"a", late), _msg(0, 6, b"a", dup), _msg(0, 7, b"a", _reading("a", NOW_MS))],
                       op, TOPICS, LIMITS, NOW_MS)
    assert out.predictions == 1 and out.dead_letters == Counter({"late": 1, "duplicate": 1})
    assert out.late == 1 and out.event_ts_ms.tolist() == [NOW_MS]  # the published prediction's event time
    dlq = {parse_dead_letter_headers(r.headers)["ls.error.class"]: r for r in _by_topic(out)["dlq"]}
    assert dlq["late"].value == late and dlq["duplicate"].value == dup and dlq["late"].key == b"a"
    assert parse_dead_letter_headers(dlq["late"].headers)["ls.source.offset"] == "5"
    assert "older than device 'a'" in parse_dead_letter_headers(dlq["late"].headers)["ls.error.reason"]


def test_alerts_are_keyed_by_device_and_carry_their_source() -> None:
    op = LiquidOperator(Forecaster(n_channels=2, hidden_size=4, cell="cfc"),
                        OperatorSettings(warmup_events=3, stuck_after=3), model_version="test")
    msgs = [_msg(2, i, b"s", _reading("s", NOW_MS - 60_000 + 1000 * i, (5.0, 1.0 + i))) for i in range(12)]
    out = handle_batch(msgs, op, TOPICS, LIMITS, NOW_MS)
    alerts = [json.loads(r.value) for r in _by_topic(out).get("alerts", [])]
    assert out.alerts == len(alerts) >= 1  # channel 0 repeats 5.0: a stuck sensor
    assert alerts[0]["device_id"] == "s" and alerts[0]["source"]["partition"] == 2
    assert all(r.key == b"s" for r in _by_topic(out)["alerts"])


class _OverflowingOperator(LiquidOperator):
    """Serves the real results, except that device "bad"'s forecast overflows float32 (inf)."""

    def process(self, device_ids: Any, ts_ms: np.ndarray, values: np.ndarray) -> StepResult:
        res = super().process(device_ids, ts_ms, values)
        res.forecast[[i for i, d in enumerate(device_ids) if d == "bad"]] = np.inf
        return res


def test_unencodable_prediction_becomes_a_dead_letter() -> None:
    op = _OverflowingOperator(Forecaster(n_channels=2, hidden_size=4, cell="cfc"), OperatorSettings())
    out = handle_batch([_msg(0, 0, b"bad", _reading("bad", NOW_MS)), _msg(0, 1, b"ok", _reading("ok", NOW_MS + 1))],
                       op, TOPICS, LIMITS, NOW_MS)
    assert out.predictions == 1 and out.dead_letters == Counter({"non_finite": 1})
    assert out.event_ts_ms.tolist() == [NOW_MS + 1]  # no latency observed for the dead-lettered one
    letters = _by_topic(out)["dlq"]
    assert len(letters) == 1 and letters[0].key == b"bad"
    assert "prediction is not finite" in dict(letters[0].headers or [])["ls.error.reason"].decode()


def test_columnar_prediction_bytes_equal_the_records() -> None:
    """The worker's byte template and the dict records (replay, demo, faust) say the same, every field."""
    op = LiquidOperator(Forecaster(n_channels=2, hidden_size=4, cell="cfc"),
                        OperatorSettings(warmup_events=2, max_gap_s=5.0), model_version="v-é")
    ids = ["a", "b", "a", "a", "a", "ö-7", "a", "b"]
    ts = np.array([1000, 1000, 2000, 2000, 1500, 3000, 60_000, 900])  # first, dup, late, long gap, ...
    vals = np.arange(16, dtype=np.float32).reshape(8, 2) / 7
    res = op.process(ids, ts, vals)
    sources = [("readings", i % 3, 100 + i) for i in range(8)]
    for src in (None, sources):
        want = prediction_records(ids, res, "v-é", src)
        got = encode_predictions(ids, res, "v-é", src)
        assert [i for i, _ in got] == [i for i, _ in want] and len(want) >= 5
        for (_, value), (_, rec) in zip(got, want, strict=True):
            assert value is not None and json.loads(value) == rec
    statuses = {rec["status"] for _, rec in prediction_records(ids, res, "v-é")}
    assert {"first", "ok+long_gap"} <= statuses and any(rec["score"] is None for _, rec in want)


def test_offsets_to_commit_is_last_offset_plus_one_per_partition() -> None:
    msgs = [_msg(1, 7, b"k", b"v"), _msg(0, 3, b"k", b"v"), _msg(1, 5, b"k", b"v"), _msg(0, 9, b"k", b"v", "other")]
    assert offsets_to_commit(msgs) == {("readings", 1): 8, ("readings", 0): 4, ("other", 0): 10}
    assert offsets_to_commit([]) == {}
    assert describe_range(msgs) == "other[0]@9..9, readings[0]@3..3, readings[1]@5..7"


def test_message_without_offset_is_a_bug_not_a_reading() -> None:
    with pytest.raises(PipelineError, match="without coordinates"):
        handle_batch([Message(topic="readings", partition=0, value=b"{}")], _operator(), TOPICS, LIMITS, NOW_MS)


def test_stats_invariant_and_report() -> None:
    stats = Stats()
    assert stats.balanced and stats.as_dict()["events_per_s"] is None
    stats.first_message = time.monotonic() - 2.0
    stats.add(BatchOutput(consumed=5, predictions=3, alerts=1,
                          dead_letters=Counter({"late": 1, "schema": 1})), busy_s=0.5)
    doc = stats.as_dict()
    assert stats.balanced and doc["balanced"] and doc["late"] == 1 and doc["duplicates"] == 0
    assert doc["dead_letters"] == 2 and doc["dead_letters_by_reason"] == {"late": 1, "schema": 1}
    assert doc["busy_events_per_s"] == 10.0 and 2.0 <= 5 / doc["events_per_s"] <= 3.0
    stats.add(BatchOutput(consumed=1), busy_s=0.1)
    assert not stats.balanced and stats.batches == 2


def test_device_registry_releases_only_the_revoked_partitions_devices() -> None:
    reg = DeviceRegistry()
    reg.note({"a": ("r", 0), "b": ("r", 1), "c": ("r", 0)})
    reg.note({"c": ("r", 2)})  # the last partition seen wins
    assert sorted(reg.release([("r", 0), ("r", 3)])) == ["a"] and len(reg) == 2


# ------------------------------------------------------------------------------------------- simulator
def test_malformed_messages_cover_every_kind_with_the_expected_dead_letter_class() -> None:
    msgs = malformed_messages(3 * len(MALFORMED_KINDS), ["dev-1", "dev-2"], n_channels=2, now_ms=NOW_MS,
                              max_payload_bytes=LIMITS.max_payload_bytes, seed=5)
    assert Counter(m.fault for m in msgs) == Counter({k: 3 for k in MALFORMED_KINDS})
    batch = decode_batch([m.value for m in msgs], [m.key for m in msgs], LIMITS, NOW_MS)
    assert len(batch) == 0
    assert [(msgs[r.index].fault, r.reason) for r in batch.rejects] == \
        [(m.fault, MALFORMED_KINDS[m.fault or ""]) for m in msgs]
    assert msgs[0].headers() == [(FAULT_HEADER, (msgs[0].fault or "").encode())]


def test_fleet_stream_and_injected_faults() -> None:
    stream = fleet_stream(20, 3000, channels=2, seed=3, anomaly_rate=20.0, end_ms=NOW_MS)
    assert len(stream.ts_ms) == 3000 and len(set(stream.device_ids.tolist())) == 20
    assert stream.ts_ms[-1] <= NOW_MS and bool(np.all(np.diff(stream.ts_ms) >= 0))
    assert all(i.start_ms <= i.end_ms <= int(stream.ts_ms[-1]) for i in stream.incidents)
    msgs = build_messages(stream, malformed=30, duplicates=10, late=5, now_ms=NOW_MS, seed=3)
    assert len(msgs) == 3045 and Counter(m.fault for m in msgs)[None] == 3000
    for i, m in enumerate(msgs):
        if m.fault == "duplicate":
            assert (msgs[i - 1].key, msgs[i - 1].value) == (m.key, m.value) and msgs[i - 1].fault is None
    late = [json.loads(m.value or b"") for m in msgs if m.fault == "late"]
    firsts: dict[str, int] = {}
    for dev, ts in zip(stream.device_ids.tolist(), stream.ts_ms.tolist(), strict=True):
        firsts.setdefault(dev, ts)
    assert len({r["device_id"] for r in late}) == 5 and all(r["ts"] == firsts[r["device_id"]] - 1000 for r in late)
    assert [m.fault for m in msgs[:2700] if m.fault == "late"] == []  # late ones sit in the last tenth


# ------------------------------------------------------------------------------------------- configs, CLI
def test_client_configs_keep_the_at_least_once_settings() -> None:
    settings = Settings(bootstrap="b:1", group_id="g", auto_offset_reset="latest",
                        kafka_config={"enable.auto.commit": "true", "enable.idempotence": "false",
                                      "partition.assignment.strategy": "range", "linger.ms": "50"})
    cons, prod = consumer_config(settings), producer_config(settings)
    assert cons["enable.auto.commit"] is False and cons["group.id"] == "g"
    assert cons["auto.offset.reset"] == "latest" and cons["partition.assignment.strategy"] == "range"
    assert prod["enable.idempotence"] is True and prod["linger.ms"] == "50" and prod["bootstrap.servers"] == "b:1"
    assert "transactional.id" not in prod and cons["isolation.level"] == "read_committed"
    txn = producer_config(settings, transactional_id(settings, "w-7"))
    assert txn["transactional.id"] == "g-tx-w-7" and txn["enable.idempotence"] is True
    assert transactional_id(Settings(transactional_id_prefix="p"), "w") == "p-w"


def test_stop_flags_map_onto_settings() -> None:
    args = build_parser().parse_args(["run", "--guarantee", "at_least_once", "--worker-id", "w-3",
                                     "--changelog-topic", "cl"])
    s = _settings(args)
    assert (s.guarantee, s.worker_id, s.changelog) == ("at_least_once", "w-3", "cl")
    defaults = _settings(build_parser().parse_args(["run", "--group-id", "g"]))
    assert defaults.guarantee == "exactly_once" and defaults.changelog == "g-state-changelog"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--guarantee", "at_most_once"])


def test_run_flags_map_onto_settings() -> None:
    args = build_parser().parse_args(["run", "--bootstrap", "k:9092", "--input-topic", "in", "--group-id", "g",
                                     "--exit-when-idle", "2.5", "--batch-max-messages", "7", "--batch-max-ms",
                                     "9", "--model", "m.pt", "--device", "cpu", "--dlq-topic", "d"])
    s = _settings(args)
    assert (s.bootstrap, s.input_topic, s.group_id, s.exit_when_idle_s, s.batch_max_messages, s.batch_max_ms,
            str(s.model), s.device, s.dlq_topic) == ("k:9092", "in", "g", 2.5, 7, 9, "m.pt", "cpu", "d")
    assert _settings(build_parser().parse_args(["run"])).exit_when_idle_s is None
    assert _settings(build_parser().parse_args(["run"])).metrics_port == 9108
    assert _settings(build_parser().parse_args(["run", "--metrics-port", "0"])).metrics_port == 0
    for bad in (["--batch-max-messages", "0"], ["--metrics-port", "65536"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", *bad])


# ------------------------------------------------------------------------------------------- the loop
CHANGELOG = "liquidstream-state-changelog"


class FakeProducer:
    """Records calls; ``abort_commits`` commits fail abortably, ``fence`` makes them fail fatally."""

    def __init__(self, log: list[str], fail_topic: str | None = None, abort_commits: int = 0,
                 fence: bool = False) -> None:
        self.log, self.fail_topic, self.abort_commits, self.fence = log, fail_topic, abort_commits, fence
        self.queued: list[tuple[str, Callable[[Any, Any], None]]] = []
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self.committed: list[tuple[str, bytes | None, bytes | None, int | None]] = []  # in committed txns
        self.offsets: list[dict[tuple[str, int], int]] = []
        self.timestamps: list[tuple[str, int]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, partition: int = -1,
                on_delivery: Callable[[Any, Any], None] | None = None, callback: Any = None, timestamp: int = 0,
                headers: Any = None) -> None:  # the real client's argument order
        assert on_delivery is not None and callback is None and isinstance(timestamp, int)
        self.timestamps.append((topic, timestamp))
        self.log.append(f"produce:{topic}")
        self.queued.append((topic, on_delivery))
        self.sent.append((topic, key, value, None if partition == -1 else partition))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = -1) -> int:
        self.log.append("flush")
        for topic, callback in self.queued:
            err = KafkaError(KafkaError._MSG_TIMED_OUT) if topic == self.fail_topic else None
            callback(err, Message(topic=topic, partition=0))
        self.queued.clear()
        return 0

    def init_transactions(self, timeout: float = -1) -> None:
        self.log.append("init")

    def begin_transaction(self) -> None:
        self.log.append("begin")
        self.sent.clear()
        self.pending_offsets: dict[tuple[str, int], int] = {}

    def send_offsets_to_transaction(self, positions: list[TopicPartition], metadata: Any, timeout: float) -> None:
        assert metadata == "group-metadata"
        self.log.append("send_offsets")
        self.pending_offsets = {(tp.topic, tp.partition): tp.offset for tp in positions}

    def commit_transaction(self, timeout: float = -1) -> None:
        if self.fence:
            raise KafkaException(KafkaError(KafkaError._FENCED, "Producer fenced by newer instance", fatal=True))
        if self.abort_commits:
            self.abort_commits -= 1
            raise KafkaException(KafkaError(KafkaError._STATE, "broker said no", txn_requires_abort=True))
        self.log.append("commit_txn")
        self.committed.extend(self.sent)
        if self.pending_offsets:
            self.offsets.append(self.pending_offsets)
        self.queued.clear()

    def abort_transaction(self, timeout: float = -1) -> None:
        self.log.append("abort")
        self.queued.clear()


class FakeConsumer:
    """Assigns partitions 0 and 1 on the first consume, then serves ``batches`` one per call; a seek serves
    the last batch again (from the sought offset on)."""

    def __init__(self, log: list[str], batches: list[list[Message]],
                 on_call: Callable[[int], None] | None = None, committed: dict[int, int] | None = None) -> None:
        self.log, self.batches, self.on_call, self.calls = log, batches, on_call, 0
        self.commits: list[dict[tuple[str, int], int]] = []
        self.callbacks: dict[str, Any] = {}
        self.last: list[Message] = []
        self.refetch: list[Message] = []  # what a seek makes the next consume deliver again
        self.seeks: list[tuple[int, int]] = []
        self.committed_offsets = committed or {}

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        self.calls += 1
        if self.calls == 1:
            self.callbacks["on_assign"](self, [TopicPartition("readings", 0), TopicPartition("readings", 1)])
        if self.on_call is not None:
            self.on_call(self.calls)
        if self.refetch:
            self.last, self.refetch = self.refetch, []
        else:
            self.last = self.batches.pop(0) if self.batches else []
        return self.last

    def seek(self, tp: TopicPartition) -> None:
        self.log.append(f"seek:{tp.partition}@{tp.offset}")
        self.seeks.append((tp.partition, tp.offset))
        self.refetch += [m for m in self.last if m.partition() == tp.partition and (m.offset() or 0) >= tp.offset]

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition, -1001))
                for tp in partitions]

    def consumer_group_metadata(self) -> str:
        return "group-metadata"

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> list[TopicPartition]:
        self.log.append("commit")
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})
        return offsets

    def close(self) -> None:
        self.log.append("close")
        if self.callbacks:  # subscribed: leaving the group revokes its partitions
            self.callbacks["on_revoke"](self, [TopicPartition("readings", 0), TopicPartition("readings", 1)])


class _Worker(KafkaWorker):
    """The real loop with the changelog topic faked: ``restored`` is what a changelog read returns."""

    restored = Restored()
    needs: list[dict[int, int]]
    ready_while_restoring: bool | None = None
    readyz_while_restoring: tuple[bool, str] | None = None

    def ensure_changelog(self) -> int:
        return 2

    def read_changelog(self, need: dict[int, int]) -> Restored:
        self.needs = [*getattr(self, "needs", []), need]
        self.ready_while_restoring = self.ready
        self.readyz_while_restoring = self.ops.check()
        return self.restored


def _worker(batches: list[list[Message]], *, fail_topic: str | None = None, guarantee: str = "at_least_once",
            on_call: Callable[[int], None] | None = None, abort_commits: int = 0, fence: bool = False,
            committed: dict[int, int] | None = None, serve_ops: bool = False, pipelined: bool = True,
            ) -> tuple[_Worker, FakeConsumer, list[str]]:
    log: list[str] = []
    consumer = FakeConsumer(log, batches, on_call, committed)
    settings = Settings(exit_when_idle_s=0.0, predictions_topic="preds", dlq_topic="dlq", ts_min_ms=0,
                        guarantee=guarantee, metrics_port=0, pipelined_commits=pipelined)  # type: ignore[arg-type]
    worker = _Worker(settings, _operator(), worker_id="w", consumer=consumer,  # type: ignore[arg-type]
                     producer=FakeProducer(log, fail_topic, abort_commits, fence),  # type: ignore[arg-type]
                     serve_ops=serve_ops)
    return worker, consumer, log


def _now_batch(partition: int, start: int, n: int, dev: str) -> list[Message]:
    now = time.time_ns() // 1_000_000
    return [_msg(partition, start + i, dev.encode(), _reading(dev, now - 10_000 + 10 * (start + i)))
            for i in range(n)]


def test_at_least_once_produces_then_flushes_then_changelog_then_commits(capsys: pytest.CaptureFixture[str]) -> None:
    batch = _now_batch(0, 0, 3, "a") + _now_batch(1, 40, 2, "b") + [_msg(1, 42, b"b", b"garbage")]
    worker, consumer, log = _worker([batch, _now_batch(0, 3, 2, "a")], pipelined=False)
    assert worker.run() == 0
    changelog = f"produce:{CHANGELOG}"
    assert log == ["produce:dlq"] + ["produce:preds"] * 5 + ["flush"] + [changelog] * 4 + ["flush", "commit"] + \
        ["produce:preds"] * 2 + ["flush"] + [changelog] * 2 + ["flush", "commit", "close", "flush"]
    assert consumer.commits == [{("readings", 0): 3, ("readings", 1): 43}, {("readings", 0): 5}]
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["consumed"] == 8 and final["predictions"] == 7 and final["dead_letters"] == 1
    assert final["balanced"] and final["exit_code"] == 0 and final["batches"] == 2
    assert final["guarantee"] == "at_least_once"
    assert len(worker.operator.store) == 0  # closing revoked both partitions: their devices were dropped


def test_pipelined_at_least_once_keeps_the_order_per_batch_while_overlapping_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # commit whatever is durable at once
    monkeypatch.setattr("liquidstream.pipeline.kafka.at_least_once.COMMIT_EVERY_S", 0.0)
    batch = _now_batch(0, 0, 3, "a") + _now_batch(1, 40, 2, "b") + [_msg(1, 42, b"b", b"garbage")]
    worker, consumer, log = _worker([batch, _now_batch(0, 3, 2, "a"), _now_batch(0, 5, 1, "a")])
    seen: list[int] = []
    consumer.on_call = lambda n: seen.append(len(consumer.commits))
    assert worker.run() == 0
    changelog = f"produce:{CHANGELOG}"
    # batch K+1's outputs go out before batch K's changelog is acknowledged; per batch: outputs, flush,
    # changelog, flush, commit -- batch 1 commits at batch 3's hand-over, the idle turn settles 2 and 3
    assert log == ["produce:dlq"] + ["produce:preds"] * 5 + ["flush"] + [changelog] * 4 + ["produce:preds"] * 2 + \
        ["flush"] + [changelog] * 2 + ["produce:preds", "commit", "flush"] + [changelog] * 2 + \
        ["flush", "commit", "close", "flush"]
    assert consumer.commits == [{("readings", 0): 3, ("readings", 1): 43}, {("readings", 0): 6}]
    assert seen[:3] == [0, 0, 0]  # batches 2 and 3 consumed with nothing committed yet
    assert worker.stats.batches == 3 and worker.stats.consumed == 9 and worker.stats.balanced


def test_pipelined_delivery_failure_found_a_batch_later_commits_nothing_more() -> None:
    worker, consumer, log = _worker([_now_batch(0, 0, 3, "a"), _now_batch(0, 3, 3, "a")], fail_topic="preds")
    assert worker.run() == 2
    assert consumer.commits == [] and "commit" not in log and worker.stats.consumed == 0
    assert f"produce:{CHANGELOG}" not in log  # no progress record claims the failed outputs were published


def test_revocation_settles_pending_batches_and_a_lost_partition_drops_its_own() -> None:
    def rebalance(n: int) -> None:
        if n == 3:  # batches 1 and 2 handed over, batch 2 still in flight
            consumer.callbacks["on_lost"](consumer, [TopicPartition("readings", 1)])
        if n == 4:
            consumer.callbacks["on_revoke"](consumer, [TopicPartition("readings", 0)])

    worker, consumer, log = _worker([_now_batch(0, 0, 2, "a"), _now_batch(0, 2, 2, "a") + _now_batch(1, 0, 2, "b"),
                                     _now_batch(0, 4, 1, "a")], on_call=rebalance)
    producer: FakeProducer = worker.producer  # type: ignore[assignment]
    assert worker.run() == 0
    # the revocation settles all three batches in one commit (COMMIT_EVERY_S not reached); [1]'s offset is lost
    assert consumer.commits == [{("readings", 0): 5}]
    assert log[-7:] == ["flush", *[f"produce:{CHANGELOG}"] * 2, "flush", "commit", "close", "flush"]
    pinned = {(k, p) for t, k, _, p in producer.sent if t == CHANGELOG}
    assert (b"a", 0) in pinned and (b"b", 1) not in pinned  # the lost partition's state is its new owner's
    assert (PROGRESS_KEY, 1) not in pinned and worker.stats.consumed == 7 and worker.stats.balanced


def test_exactly_once_commits_outputs_changelog_and_offsets_in_one_transaction() -> None:
    batch = _now_batch(0, 0, 3, "a") + _now_batch(1, 40, 2, "b") + [_msg(1, 42, b"b", b"garbage")]
    worker, consumer, log = _worker([batch], guarantee="exactly_once")
    producer: FakeProducer = worker.producer  # type: ignore[assignment]
    assert worker.run() == 0
    changelog = f"produce:{CHANGELOG}"
    assert log == ["init", "begin", "produce:dlq"] + ["produce:preds"] * 5 + [changelog] * 4 + \
        ["send_offsets", "commit_txn", "close", "flush"]
    assert consumer.commits == [] and producer.offsets == [{("readings", 0): 3, ("readings", 1): 43}]
    state = {(k, p): v for t, k, v, p in producer.committed if t == CHANGELOG}
    assert set(state) == {(b"a", 0), (b"b", 1), (PROGRESS_KEY, 0), (PROGRESS_KEY, 1)}  # pinned partitions
    assert json.loads(state[(PROGRESS_KEY, 1)] or b"") == {"topic": "readings", "partition": 1, "offset": 43}
    assert worker.stats.predictions == 5 and worker.stats.aborted == 0


def _predictions(producer: FakeProducer) -> list[tuple[bytes | None, bytes | None]]:
    return [(k, v) for t, k, v, _ in producer.committed if t == "preds"]


def test_aborted_transaction_rewinds_state_and_position_then_gives_the_same_predictions() -> None:
    fixed = [_now_batch(0, 0, 4, "a"), _now_batch(0, 4, 3, "a") + _now_batch(1, 0, 3, "c")]

    def batches() -> list[list[Message]]:
        return [list(b) for b in fixed]  # the same messages (and event times) for both runs

    clean, _, _ = _worker(batches(), guarantee="exactly_once")
    assert clean.run() == 0
    worker, consumer, log = _worker(batches(), guarantee="exactly_once")
    producer: FakeProducer = worker.producer  # type: ignore[assignment]
    real_commit, real_rewind, calls = producer.commit_transaction, worker._rewind, [0]
    state_a: list[bytes] = []

    def second_commit_aborts(timeout: float = -1) -> None:
        calls[0] += 1
        if calls[0] == 2:
            state_a.append(worker.operator.store.snapshot(["a"]))  # after the batch, before the abort
            raise KafkaException(KafkaError(KafkaError._STATE, "abortable", txn_requires_abort=True))
        real_commit(timeout)

    def rewind(batch: list[Message], undo: StateUndo) -> None:
        real_rewind(batch, undo)
        state_a.append(worker.operator.store.snapshot(["a"]))
        assert "c" not in worker.operator.store  # created by the aborted batch: gone again

    producer.commit_transaction = second_commit_aborts  # type: ignore[method-assign]
    worker._rewind = rewind  # type: ignore[method-assign]
    assert worker.run() == 0
    assert "abort" in log and consumer.seeks == [(0, 4), (1, 0)] and state_a[0] != state_a[1]
    assert worker.stats.aborted == 1 and worker.stats.predictions == 10 and worker.stats.balanced
    assert producer.offsets == [{("readings", 0): 4}, {("readings", 0): 7, ("readings", 1): 3}]
    assert _predictions(producer) == _predictions(clean.producer)  # type: ignore[arg-type]


def test_fenced_producer_exits_non_zero_without_committing() -> None:
    worker, consumer, log = _worker([_now_batch(0, 0, 3, "a")], guarantee="exactly_once", fence=True)
    assert worker.run() == 2
    assert "commit_txn" not in log and worker.stats.consumed == 0 and consumer.commits == []
    assert log[-2:] == ["close", "flush"]


def test_failed_delivery_exits_non_zero_without_committing() -> None:
    worker, consumer, log = _worker([_now_batch(0, 0, 3, "a")], fail_topic="preds")
    assert worker.run() == 2
    assert consumer.commits == [] and "commit" not in log and worker.stats.consumed == 0


def test_bug_in_processing_exits_non_zero_without_committing(monkeypatch: pytest.MonkeyPatch) -> None:
    for guarantee in ("at_least_once", "exactly_once"):
        worker, consumer, log = _worker([_now_batch(0, 0, 3, "a")], guarantee=guarantee)

        def broken(*args: Any, **kwargs: Any) -> Any:
            msg = "boom"
            raise RuntimeError(msg)

        monkeypatch.setattr(worker.operator, "process", broken)
        assert worker.run() == 1
        assert consumer.commits == [] and not any(e.startswith(("produce", "begin")) for e in log)


def test_stop_signal_finishes_the_current_batch_then_exits_zero() -> None:
    holder: list[KafkaWorker] = []
    worker, consumer, _ = _worker([_now_batch(0, 0, 3, "a"), _now_batch(0, 3, 3, "a")],
                                  on_call=lambda n: holder[0].stop(15) if n == 1 else None)
    holder.append(worker)
    assert worker.run() == 0
    assert consumer.commits == [{("readings", 0): 3}] and len(consumer.batches) == 1


def test_revoked_partition_messages_are_left_for_the_new_owner() -> None:
    def revoke(n: int) -> None:
        if n == 2:
            consumer.callbacks["on_revoke"](consumer, [TopicPartition("readings", 1)])

    worker, consumer, _ = _worker([_now_batch(1, 0, 2, "b"), _now_batch(1, 2, 2, "b") + _now_batch(0, 0, 1, "a")],
                                  on_call=revoke)
    assert worker.run() == 0
    assert consumer.commits == [{("readings", 1): 2}, {("readings", 0): 1}]
    assert worker.stats.skipped_revoked == 2 and worker.stats.balanced


def _restored(devices: dict[str, int], progress: dict[int, int]) -> tuple[Restored, bytes]:
    """A changelog read holding ``devices`` (id -> partition) after 5 readings each, and their state."""
    op = _operator()
    now = time.time_ns() // 1_000_000
    for d in devices:
        handle_batch([_msg(devices[d], i, d.encode(), _reading(d, now - 60_000 + 1000 * i)) for i in range(5)],
                     op, TOPICS, LIMITS, now)
    layout = StateLayout(op.store)
    blobs = dict(layout.split(op.store.snapshot(list(devices))))
    return Restored(blobs=blobs, partition_of=dict(devices), progress=progress,
                    model_version=dict.fromkeys(devices, "test")), op.store.snapshot(list(devices))


def test_assignment_restores_state_before_the_first_batch_and_flags_readiness() -> None:
    restored, state = _restored({"a": 0, "b": 1}, {0: 7, 1: 3})
    seen: list[Any] = []
    worker, consumer, _ = _worker([], guarantee="exactly_once", committed={0: 7, 1: 3},
                                  on_call=lambda n: seen.extend([worker.operator.store.snapshot(["a", "b"]),
                                                                 worker.registry.partitions_of(["a", "b"])]))
    worker.restored = restored
    assert not worker.ready
    assert worker.run() == 0
    assert worker.needs == [{0: 7, 1: 3}] and worker.ready_while_restoring is False
    assert seen[0] == state and worker.stats.restored_devices == 2 and worker.stats.skipped_replayed == 0
    assert seen[1] == {"a": ("readings", 0), "b": ("readings", 1)}  # so a revocation drops them


def test_at_least_once_skips_readings_the_restored_state_already_holds() -> None:
    restored, _ = _restored({"a": 0}, {0: 5})  # changelog written for offsets < 5; offsets committed < 3
    worker, consumer, _ = _worker([_now_batch(0, 3, 4, "a")], committed={0: 3})
    worker.restored = restored
    assert worker.run() == 0
    assert worker.stats.skipped_replayed == 2 and worker.stats.consumed == 2
    assert consumer.commits == [{("readings", 0): 7}]


def test_at_least_once_commits_past_replays_even_with_nothing_newer() -> None:
    # The predecessor died after its changelog (progress 5) and before its offset commit (3): the only readings
    # left are replays.  They are skipped, and their offsets still commit, or the partition stays behind.
    restored, _ = _restored({"a": 0}, {0: 5})
    worker, consumer, _ = _worker([_now_batch(0, 3, 2, "a")], committed={0: 3})
    worker.restored = restored
    assert worker.run() == 0
    assert worker.stats.skipped_replayed == 2 and worker.stats.consumed == 0
    assert consumer.commits == [{("readings", 0): 5}]


def test_idle_devices_are_evicted_with_a_changelog_tombstone() -> None:
    worker, _, log = _worker([], guarantee="exactly_once")
    producer: FakeProducer = worker.producer  # type: ignore[assignment]
    now = time.time_ns() // 1_000_000
    handle_batch([_msg(0, 0, b"old", _reading("old", now - 3 * 86_400_000)), _msg(1, 0, b"new", _reading("new", now))],
                 worker.operator, TOPICS, LIMITS, now)
    worker.registry.note({"old": ("readings", 0), "new": ("readings", 1)})
    worker._evict_idle()
    assert log == ["begin", f"produce:{CHANGELOG}", "commit_txn"]
    assert producer.committed == [(CHANGELOG, b"old", None, 0)]
    assert worker.operator.store.device_ids() == ["new"] and len(worker.registry) == 1


def test_an_alert_open_on_an_evicted_device_closes_in_the_tombstones_transaction() -> None:
    from liquidstream.pipeline.wire.contract import AlertRecord

    worker, _, log = _worker([], guarantee="exactly_once")
    producer: FakeProducer = worker.producer  # type: ignore[assignment]
    now = time.time_ns() // 1_000_000
    old_ts = now - 3 * 86_400_000
    handle_batch([_msg(0, 0, b"old", _reading("old", old_ts)), _msg(1, 0, b"new", _reading("new", now))],
                 worker.operator, TOPICS, LIMITS, now)
    worker.registry.note({"old": ("readings", 0), "new": ("readings", 1)})
    worker._positions = {("readings", 0): 1, ("readings", 1): 1}
    store, row = worker.operator.store, int(worker.operator.store.lookup(["old"])[0])
    store.tensors["alert_open"][row], store.tensors["alert_peak"][row] = True, 9.5  # open since its reading
    store.tensors["alert_reason"][row], store.host["alert_open_ms"][row] = 1, old_ts
    worker._evict_idle()
    assert log == ["begin", "produce:alerts", f"produce:{CHANGELOG}", "commit_txn"]
    (topic, key, value, _), tomb = producer.committed
    rec = AlertRecord.model_validate_json(value or b"")
    assert (topic, key, tomb) == ("alerts", b"old", (CHANGELOG, b"old", None, 0))
    assert (rec.event, rec.closed_by, rec.alert_id, rec.ts, rec.duration_ms, rec.score, rec.reason) == (
        "closed", "evicted", f"old@{old_ts}", old_ts, 0, 9.5, "stuck_sensor")
    assert (rec.source.partition, rec.source.offset) == (0, 0)  # type: ignore[union-attr]
    assert producer.timestamps[0] == ("alerts", old_ts)  # its event time


def test_state_undo_puts_back_known_devices_and_drops_new_ones() -> None:
    op = _operator()
    now = time.time_ns() // 1_000_000
    handle_batch([_msg(0, 0, b"a", _reading("a", now - 5000))], op, TOPICS, LIMITS, now)
    before = op.store.snapshot(["a"])
    undo = StateUndo(op.store)
    handle_batch([_msg(0, 1, b"a", _reading("a", now - 4000)), _msg(0, 2, b"n", _reading("n", now))], op, TOPICS,
                 LIMITS, now, before_process=undo.take)
    assert op.store.snapshot(["a"]) != before and "n" in op.store
    undo.apply()
    assert op.store.snapshot(["a"]) == before and "n" not in op.store


def test_delivery_tracker_reports_the_first_failure() -> None:
    tracker = DeliveryTracker()
    tracker(None, Message(topic="p", partition=0))
    tracker.check()
    tracker(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), Message(topic="dlq", partition=3))
    with pytest.raises(KafkaDeliveryError, match=r"dlq\[3\]") as info:
        tracker.check()
    assert info.value.topic == "dlq" and info.value.partition == 3
    tracker.check()  # cleared


# ------------------------------------------------------------------------------------------- metrics, probes
def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.read().decode()


def test_worker_metrics_follow_batches_restores_and_revocations() -> None:
    now = time.time_ns() // 1_000_000
    first = _now_batch(0, 0, 3, "a") + _now_batch(1, 0, 2, "b") + [_msg(1, 2, b"b", b"garbage")]
    late = [_msg(0, 3, b"a", _reading("a", now - 60_000)), _msg(0, 4, b"c", _reading("c", now, (1.0,)))]
    seen: list[tuple[float | None, ...]] = []

    def probe(n: int) -> None:  # before consume n: what the loop reported after batch n - 1
        m = worker.ops.metrics
        seen.append((m.value("liquidstream_events_processed_total"), m.value("liquidstream_devices")))

    worker, _, _ = _worker([first, late], guarantee="exactly_once", on_call=probe)
    m = worker.ops.metrics
    assert worker.ops.check() == (False, "no partition assignment yet")
    assert worker.run() == 0
    assert worker.readyz_while_restoring is not None and not worker.readyz_while_restoring[0]
    assert worker.readyz_while_restoring[1].startswith("restoring state of 2 partition(s): readings[0]")
    assert seen[:3] == [(0.0, 0.0), (6.0, 2.0), (8.0, 2.0)]  # a batch, then the late one and a wrong length
    assert m.value("liquidstream_predictions_total") == 5 and m.value("liquidstream_late_events_total") == 1
    assert {r: m.value("liquidstream_dead_letters_total", reason=r) for r in ("schema", "malformed_json", "late",
            "wrong_length")} == {"schema": None, "malformed_json": 1, "late": 1, "wrong_length": 1}
    assert m.value("liquidstream_end_to_end_latency_seconds_count") == 5
    assert m.value("liquidstream_batch_seconds_count") == 2
    assert m.value("liquidstream_model_version", version="test") == 1
    assert m.value("liquidstream_restore_progress") == 1.0
    assert m.value("liquidstream_devices") == 0  # closing revoked both partitions
    assert worker.ops.watch.commits == {}  # and their commits are no longer reported as lag
    assert worker.ops.health.silence_s() < 5 and worker.ops.check() == (True, "ready")  # joined, nothing assigned


def test_lag_counts_from_the_worker_commits_under_exactly_once() -> None:
    worker, _, _ = _worker([_now_batch(0, 0, 3, "a")], guarantee="exactly_once",
                           on_call=lambda n: stats() if n == 2 else None)

    def stats() -> None:  # librdkafka's consumer_lag still counts from the offset fetched at assignment (0)
        parts = {"0": {"desired": True, "consumer_lag": 10, "ls_offset": 10, "hi_offset": 10, "app_offset": 10}}
        worker.ops.watch.stats_cb(json.dumps({"topics": {"readings": {"partitions": parts}}}))
        lag.append(worker.ops.metrics.value("liquidstream_consumer_lag", partition="0"))

    lag: list[float | None] = []
    assert worker.run() == 0
    assert lag == [7.0]  # end 10 - committed 3
    assert worker.ops.metrics.value("liquidstream_consumer_lag", partition="0") is None  # revoked at close


def test_worker_serves_metrics_health_and_readiness_while_it_runs() -> None:
    got: dict[str, tuple[int, str]] = {}

    def scrape(n: int) -> None:
        port = worker.ops.port
        assert port is not None
        if n == 2:  # after the assignment (restore done) and one batch
            got.update({path: _http(port, path) for path in ("/metrics", "/healthz", "/readyz")})

    # not pipelined: the batch is committed (and counted) before the next consume, where this scrapes
    worker, _, _ = _worker([_now_batch(0, 0, 3, "a"), []], on_call=scrape, serve_ops=True, pipelined=False)
    assert worker.run() == 0
    assert got["/readyz"] == (200, '{"status": "ready", "reason": "ready"}\n')
    assert got["/healthz"][0] == 200 and json.loads(got["/healthz"][1])["status"] == "ok"
    assert got["/metrics"][0] == 200 and "liquidstream_events_processed_total 3.0" in got["/metrics"][1]
    assert worker.ops.server is None  # stopped at shutdown


def test_ops_port_in_use_falls_back_to_an_ephemeral_one(caplog: pytest.LogCaptureFixture) -> None:
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))  # noqa: S104 - the worker binds every interface
    taken.listen()
    ops = WorkerOps(Settings())
    try:
        with caplog.at_level("WARNING", logger="liquidstream.worker"):
            port = ops.start(taken.getsockname()[1])
        assert port not in (0, taken.getsockname()[1]) and _http(port, "/healthz")[0] == 200
        assert f"serving /metrics, /healthz, /readyz on port {port} instead" in caplog.text
    finally:
        ops.stop()
        taken.close()


def test_ops_port_that_cannot_be_bound_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: OpsServer, port: int) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(OpsServer, "start", denied)
    worker, _, _ = _worker([], serve_ops=True)
    with pytest.raises(ConfigurationError, match="cannot serve /metrics, /healthz, /readyz on port 0"):
        worker.ops.start(0)
    assert worker.run() == 2  # the loop reports it as a configuration error, not as a bug


def test_changelog_read_is_retried_while_its_leaders_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """A changelog topic created a moment ago is in the metadata before its broker leads it (a real race)."""
    worker, _, _ = _worker([])
    codes = [KafkaError.NOT_LEADER_FOR_PARTITION, None, KafkaError.TOPIC_AUTHORIZATION_FAILED]

    def read(consumer: Any, topic: str, need: dict[int, int], timeout_s: float) -> Restored:
        code = codes.pop(0)
        if code is None:
            return Restored(records=3)
        err = PipelineError(f"reading changelog {topic} failed")
        err.__cause__ = KafkaException(KafkaError(code))
        raise err

    monkeypatch.setattr("liquidstream.pipeline.kafka.changelog.read_changelog", read)
    monkeypatch.setattr("liquidstream.pipeline.kafka.changelog.restore_consumer", lambda settings: object())
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    assert KafkaWorker.read_changelog(worker, {0: 5}).records == 3 and len(codes) == 1
    with pytest.raises(PipelineError, match="reading changelog"):  # not a moving leader: no retry
        KafkaWorker.read_changelog(worker, {0: 5})
    assert codes == []
