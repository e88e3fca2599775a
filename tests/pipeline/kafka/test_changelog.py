"""The state changelog without a broker: per-device snapshot bytes (split and merge), the records a commit
writes, the restore reader (last record per key wins, tombstones delete, progress must catch up with the
committed offsets), and changelog topic creation."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.errors import StateFormatError
from liquidstream.operators.state.store import DeviceStateStore
from liquidstream.pipeline.errors import ConfigurationError, PipelineError
from liquidstream.pipeline.kafka import changelog
from liquidstream.pipeline.kafka.changelog import (
    H_MODEL,
    H_OFFSET,
    H_PARTITION,
    PROGRESS_KEY,
    StateLayout,
    changelog_records,
    ensure_topic,
    read_changelog,
    tombstones,
)
from liquidstream.pipeline.settings import Settings

TOPIC = "g-state-changelog"
DEVICES = ["pump-1", "pümpé \"2\"", "x/3", "δ-4"]  # non-ASCII and quotes: the JSON header must match exactly


def _store(devices: list[str] = DEVICES, hidden: int = 6, channels: int = 3) -> DeviceStateStore:
    """A store whose devices have applied a few different readings each."""
    op = LiquidOperator(Forecaster(n_channels=channels, hidden_size=hidden, cell="cfc"), OperatorSettings())
    rng = np.random.default_rng(4)
    ids = [d for d in devices for _ in range(4)]
    ts = np.array([1_700_000_000_000 + 1000 * i for i in range(len(ids))], dtype=np.int64)
    op.process(ids, ts, rng.normal(size=(len(ids), channels)).astype(np.float32))
    return op.store


def test_split_gives_each_device_exactly_its_own_snapshot() -> None:
    store = _store()
    parts = StateLayout(store).split(store.snapshot(DEVICES))
    assert [d for d, _ in parts] == DEVICES
    assert all(blob == store.snapshot([d]) for d, blob in parts)
    assert StateLayout(store).split(store.snapshot([])) == []


def test_merge_restores_every_device_bit_for_bit() -> None:
    store = _store()
    layout = StateLayout(store)
    merged = layout.merge(dict(layout.split(store.snapshot(DEVICES))))
    fresh = DeviceStateStore(6, 3)
    assert fresh.restore(merged) == DEVICES
    assert fresh.snapshot(DEVICES) == store.snapshot(DEVICES)
    for name, tensor in store.tensors.items():
        assert np.array_equal(fresh.tensors[name][:4].numpy(), tensor[store.lookup(DEVICES)].numpy()), name
    assert DeviceStateStore(6, 3).restore(layout.merge({})) == []


@pytest.mark.parametrize("bad", ["other model", "two devices", "wrong key", "junk"])
def test_merge_rejects_values_that_are_not_this_models_single_device_state(bad: str) -> None:
    store = _store()
    value = {"other model": _store(["pump-1"], hidden=5).snapshot(["pump-1"]),  # another hidden size
             "two devices": store.snapshot(DEVICES[:2]), "wrong key": store.snapshot(["x/3"]),
             "junk": b"junk"}[bad]
    with pytest.raises(StateFormatError, match="'pump-1' is not a single-device state snapshot of this model"):
        StateLayout(store).merge({"x/3": store.snapshot(["x/3"]), "pump-1": value})


def test_records_pin_the_input_partition_and_carry_the_offset() -> None:
    store = _store()
    devices = {"pump-1": ("readings", 2), "x/3": ("readings", 0), "gone": ("readings", 0)}
    recs = changelog_records(StateLayout(store), store, devices, {("readings", 2): 41, ("readings", 0): 7}, TOPIC,
                             "v9")
    assert [(r.key, r.partition) for r in recs] == [(b"pump-1", 2), (b"x/3", 0), (PROGRESS_KEY, 0),
                                                    (PROGRESS_KEY, 2)]  # unknown devices skipped
    assert recs[0].value == store.snapshot(["pump-1"]) and all(r.topic == TOPIC for r in recs)
    headers = dict(recs[0].headers or [])
    assert (headers[H_PARTITION], headers[H_OFFSET], headers[H_MODEL]) == (b"2", b"41", b"v9")
    assert json.loads(recs[3].value or b"") == {"topic": "readings", "partition": 2, "offset": 41}
    assert [(t.key, t.value, t.partition) for t in tombstones({"x/3": ("readings", 1)}, TOPIC)] == \
        [(b"x/3", None, 1)]


# ------------------------------------------------------------------------------------------- restore reader
class FakeLog:
    """A read_committed consumer over a fixed changelog: data, then an end-of-partition event per partition.
    ``late`` records appear (with a higher end) once the reader has hit the end of their partition."""

    def __init__(self, records: dict[int, list[tuple[bytes, bytes | None]]],
                 late: dict[int, list[tuple[bytes, bytes | None]]] | None = None) -> None:
        self.logs = {p: list(recs) for p, recs in records.items()}
        self.late = late or {}
        self.queue: list[Message] = []
        self.assigned: list[int] = []
        self.unassigned = False

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = [tp.partition for tp in tps]
        for p in self.assigned:
            self._serve(p, 0)

    def _serve(self, p: int, start: int) -> None:
        log = self.logs.get(p, [])
        for o, (key, value) in enumerate(log[start:], start):
            headers: list[tuple[str, str | bytes | None]] | None = \
                None if key == PROGRESS_KEY else [(H_MODEL, b"v1")]
            self.queue.append(Message(topic=TOPIC, partition=p, offset=o, key=key, value=value, headers=headers))
        self.queue.append(Message(topic=TOPIC, partition=p, offset=len(log) + 1,  # +1: a commit marker
                                  error=KafkaError(KafkaError._PARTITION_EOF)))

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = -1) -> tuple[int, int]:
        p = tp.partition
        if p in self.late and p in self.assigned and not any(m.partition() == p for m in self.queue):
            start = len(self.logs.setdefault(p, []))
            self.logs[p] += self.late.pop(p)
            self._serve(p, start)
        return 0, len(self.logs.get(p, [])) + 1 if self.logs.get(p) else 0

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        out, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return out

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, tp.partition, -1001) for tp in tps]

    def unassign(self) -> None:
        self.unassigned = True


def _progress(offset: int) -> tuple[bytes, bytes]:
    return PROGRESS_KEY, json.dumps({"topic": "readings", "partition": 0, "offset": offset}).encode()


def test_reader_keeps_the_last_record_per_key_and_applies_tombstones() -> None:
    fake = FakeLog({0: [(b"a", b"a1"), (b"b", b"b1"), _progress(10), (b"a", b"a2"), (b"b", None), _progress(20)],
                    1: [(b"c", b"c1"), _progress(3)]})
    got = read_changelog(fake, TOPIC, {0: 20, 1: 3, 2: -1}, timeout_s=5)  # type: ignore[arg-type]
    assert got.blobs == {"a": b"a2", "c": b"c1"} and got.partition_of == {"a": 0, "c": 1}
    assert got.progress == {0: 20, 1: 3} and got.records == 5 and got.model_version == {"a": "v1", "c": "v1"}
    assert fake.assigned == [0, 1, 2] and fake.unassigned


def test_reader_waits_for_the_progress_the_group_committed() -> None:
    # The group committed offset 30, but the transaction's changelog records land after the first read.
    fake = FakeLog({0: [(b"a", b"a1"), _progress(10)]}, late={0: [(b"a", b"a3"), _progress(30)]})
    got = read_changelog(fake, TOPIC, {0: 30}, timeout_s=5)  # type: ignore[arg-type]
    assert got.blobs == {"a": b"a3"} and got.progress == {0: 30}


def test_reader_accepts_a_missing_changelog_but_not_a_lagging_one(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(changelog, "PROGRESS_GRACE_S", 0.05)
    got = read_changelog(FakeLog({}), TOPIC, {0: 500}, timeout_s=5)  # type: ignore[arg-type]
    assert got.blobs == {} and "no progress record" in caplog.text  # e.g. the first run with a changelog
    start = time.monotonic()
    with pytest.raises(PipelineError, match=r"g-state-changelog\[0\] reflects input up to offset 10, but the "
                                            r"group committed offset 500"):
        read_changelog(FakeLog({0: [_progress(10)]}), TOPIC, {0: 500}, timeout_s=0.2)  # type: ignore[arg-type]
    assert time.monotonic() - start < 5


def test_reader_reports_broken_partitions_with_their_offset() -> None:
    fake = FakeLog({})
    fake.assign = lambda tps: setattr(fake, "queue", [Message(  # type: ignore[method-assign]
        topic=TOPIC, partition=1, offset=77, error=KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))])
    with pytest.raises(PipelineError, match=r"changelog g-state-changelog\[1\] at offset 77"):
        read_changelog(fake, TOPIC, {1: -1}, timeout_s=1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- topic creation
class FakeAdmin:
    def __init__(self, topics: dict[str, int], exists_error: bool = False) -> None:
        self.topics, self.exists_error = topics, exists_error
        self.created: list[Any] = []

    def list_topics(self, topic: str, timeout: float = -1) -> Any:
        if topic not in self.topics:
            return SimpleNamespace(topics={})
        leaders = {p: SimpleNamespace(leader=1) for p in range(self.topics[topic])}
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions=leaders)})

    def create_topics(self, new: list[Any]) -> dict[str, Any]:
        self.created += new
        self.topics[new[0].topic] = new[0].num_partitions

        def result(timeout: float) -> None:
            if self.exists_error:
                raise KafkaException(KafkaError(KafkaError.TOPIC_ALREADY_EXISTS))

        return {new[0].topic: SimpleNamespace(result=result)}


def test_changelog_topic_is_created_compacted_with_the_input_partition_count() -> None:
    admin = FakeAdmin({"readings": 6})
    assert ensure_topic(admin, Settings(input_topic="readings", group_id="g")) == 6  # type: ignore[arg-type]
    (new,) = admin.created
    assert (new.topic, new.num_partitions, new.config) == (TOPIC, 6, {"cleanup.policy": "compact"})
    raced = FakeAdmin({"readings": 6}, exists_error=True)  # another worker created it first: fine
    assert ensure_topic(raced, Settings(input_topic="readings", group_id="g")) == 6  # type: ignore[arg-type]
    existing = FakeAdmin({"readings": 4, TOPIC: 4})
    assert ensure_topic(existing, Settings(input_topic="readings", group_id="g")) == 4  # type: ignore[arg-type]
    assert existing.created == []


def test_changelog_topic_problems_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="input topic readings does not exist"):
        ensure_topic(FakeAdmin({}), Settings(input_topic="readings", group_id="g"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="changelog topic g-state-changelog has 2 partition"):
        ensure_topic(FakeAdmin({"readings": 4, TOPIC: 2}),  # type: ignore[arg-type]
                     Settings(input_topic="readings", group_id="g"))
