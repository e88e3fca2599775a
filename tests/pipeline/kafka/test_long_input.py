"""The long input shape on a topic: channels waiting across batches, in the changelog, rewound on abort."""

from __future__ import annotations

import json

from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.pipeline.kafka.batch_step import handle_batch
from liquidstream.pipeline.kafka.changelog import PROGRESS_KEY, Restored, StateLayout, changelog_records
from liquidstream.pipeline.kafka.long_input import Part, StreamAssembly
from liquidstream.pipeline.kafka.output import OutputTopics
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.codec import DecodeLimits
from liquidstream.pipeline.wire.mapping import InputMapping
from tests.pipeline.kafka.test_worker_unit import FakeConsumer, FakeProducer, _Worker

NOW_MS = 1_800_000_000_000
MAPPING = InputMapping(shape="long", device_field="device", channel_fields=("temp", "rpm"))
LIMITS = DecodeLimits(n_channels=2, max_payload_bytes=4096, ts_min_ms=0, max_future_ms=60_000, mapping=MAPPING)
TOPICS = OutputTopics("preds", "alerts", "dlq")
WINDOW_MS = 10_000


def part(partition: int, offset: int, dev: str, ts: int, channel: str, value: float) -> Message:
    body = json.dumps({"device": dev, "ts": ts, "channel": channel, "value": value}).encode()
    return Message(topic="readings", partition=partition, offset=offset, key=dev.encode(), value=body,
                   headers=[("trace", b"t-%d" % offset)], timestamp=(TIMESTAMP_CREATE_TIME, ts + 7))


def coords(messages: list[Message]) -> list[tuple[str, int, int]]:
    return [(m.topic(), m.partition(), m.offset()) for m in messages]


def operator() -> LiquidOperator:
    return LiquidOperator(Forecaster(n_channels=2, hidden_size=4, cell="cfc"), OperatorSettings(), model_version="t")


def stream() -> list[Message]:
    """Two devices on two partitions, channels interleaved; p's reading at 2000 straddles offsets 2..4."""
    return [part(0, 0, "p", 1000, "temp", 1.0), part(0, 1, "p", 1000, "rpm", 2.0), part(0, 2, "p", 2000, "rpm", 3.0),
            part(1, 0, "q", 1000, "rpm", 5.0), part(0, 3, "p", 2000, "rpm", 9.0),  # repeat: duplicate
            part(0, 4, "p", 2000, "temp", 4.0), part(1, 1, "q", 1000, "temp", 6.0),
            part(0, 5, "p", 3000, "temp", 7.0),  # never completed
            part(0, 6, "p", 3000 + WINDOW_MS + 1, "temp", 8.0),  # moves p's event time past the window
            part(0, 7, "p", 3000, "rpm", 7.5)]  # too late for its reading: incomplete, whatever the batches


def run(batches: list[list[Message]]) -> tuple[list[tuple[int, str, int, list[float]]], list[tuple[int, str]]]:
    """(completing offset, device, ts, values) per reading and (offset, reason) per part given up, over batches
    fed one by one through a fresh assembly restored from the previous one's state at every boundary."""
    readings, letters = [], []
    state: dict[tuple[str, int], object] = {}
    for batch in batches:
        assembly = StreamAssembly(LIMITS, WINDOW_MS)
        for tp, doc in state.items():
            assembly.restore(tp, json.loads(json.dumps(doc)))  # through JSON, as in the progress record
        decoded, given_up = assembly.decode(batch, coords(batch), NOW_MS)
        readings += [(batch[i].offset(), d, int(t), v.tolist()) for i, d, t, v in
                     zip(decoded.index.tolist(), decoded.device_ids, decoded.ts_ms, decoded.values, strict=True)]
        letters += [(p.offset, reason.value) for p, reason, _ in given_up]
        state = {tp: assembly.state(tp) for tp in assembly.parts}
    return readings, sorted(letters)


def test_readings_straddling_batches_and_restarts_come_out_as_in_one_batch() -> None:
    msgs = stream()
    whole = run([msgs])
    assert whole[0] == [(1, "p", 1000, [1.0, 2.0]), (4, "p", 2000, [4.0, 3.0]), (1, "q", 1000, [6.0, 5.0])]
    assert whole[1] == [(3, "duplicate"), (5, "incomplete"), (7, "incomplete")]
    for cut in range(1, len(msgs)):
        assert run([msgs[:cut], msgs[cut:]]) == whole, cut
    assert run([[m] for m in msgs]) == whole  # every message its own batch, state through JSON each time


def test_a_part_given_up_later_is_the_message_consumed_with_its_headers_and_timestamp() -> None:
    msgs = stream()
    assembly = StreamAssembly(LIMITS, WINDOW_MS)
    assembly.decode(msgs[:8], coords(msgs[:8]), NOW_MS)
    restored = StreamAssembly(LIMITS, WINDOW_MS)
    restored.restore(("readings", 0), json.loads(json.dumps(assembly.state(("readings", 0)))))
    out = handle_batch(msgs[8:], operator(), TOPICS, LIMITS, NOW_MS, assembly=restored)
    letters = sorted((r for r in out.records if r.topic == "dlq"), key=lambda r: r.value or b"", reverse=True)
    assert [(r.value, r.timestamp) for r in letters] == [(msgs[7].value(), 3007), (msgs[9].value(), 3007)]
    headers = dict(letters[0].headers or [])
    assert headers["trace"] == b"t-5" and headers["ls.error.class"] == b"incomplete"  # list index 7: offset 5
    assert headers["ls.source.offset"] == b"5"
    assert out.consumed == 2 and out.predictions == 0 and out.dead_letters["incomplete"] == 2


def test_state_is_capped_and_gives_up_the_oldest_readings() -> None:
    assembly = StreamAssembly(LIMITS, WINDOW_MS, max_bytes=700)
    msgs = [part(0, i, f"d{i}", 1000, "temp", 1.0) for i in range(5)]
    _, given_up = assembly.decode(msgs, coords(msgs), NOW_MS)
    assert given_up and [p.offset for p, _, _ in given_up] == list(range(len(given_up)))  # oldest first
    assert len(json.dumps(assembly.state(("readings", 0)))) <= 700
    assert len(assembly.parts[("readings", 0)]) == 5 - len(given_up)


def test_the_progress_record_carries_the_waiting_channels_and_a_restore_reads_them() -> None:
    op = operator()
    assembly = StreamAssembly(LIMITS, WINDOW_MS)
    msgs = stream()[:3]
    out = handle_batch(msgs, op, TOPICS, LIMITS, NOW_MS, assembly=assembly)
    waiting = {tp: assembly.state(tp) for tp in out.commits}
    records = changelog_records(StateLayout(op.store), op.store, out.device_partitions, out.commits, "cl", "t",
                                waiting)
    progress = [json.loads(r.value or b"") for r in records if r.key == PROGRESS_KEY]
    assert progress == [{"topic": "readings", "partition": 0, "offset": 3, "waiting": waiting[("readings", 0)]}]
    assert progress[0]["waiting"]["waiting"][0][:3] == ["p", 2000, [None, 3.0]]


def _long_worker(batches: list[list[Message]], restored: Restored, abort_commits: int = 0) -> tuple[
        _Worker, FakeProducer]:
    log: list[str] = []
    settings = Settings(exit_when_idle_s=0.0, predictions_topic="preds", dlq_topic="dlq", ts_min_ms=0,
                        guarantee="exactly_once", metrics_port=0, mapping=MAPPING.model_dump())
    producer = FakeProducer(log, None, abort_commits)
    worker = _Worker(settings, operator(), worker_id="w", consumer=FakeConsumer(log, batches),  # type: ignore[arg-type]
                     producer=producer)  # type: ignore[arg-type]
    worker.restored = restored
    return worker, producer


def test_the_worker_restores_waiting_channels_and_rewinds_them_on_abort() -> None:
    msgs = stream()
    first, sent = _long_worker([msgs[:3]], Restored())
    assert first.run() == 0
    progress = [json.loads(v or b"") for t, k, v, _ in sent.committed if k == PROGRESS_KEY][-1]
    # a new worker: the changelog says offsets 0..2 of partition 0 are in, p's rpm at 2000 waits
    second, producer = _long_worker([msgs[3:6]], Restored(progress={0: 3, 1: 0}, waiting={0: progress["waiting"]}),
                                    abort_commits=1)  # the first transaction aborts: the batch is consumed again
    assert second.run() == 0
    preds = [json.loads(v or b"") for t, _, v, _ in producer.committed if t == "preds"]
    assert [(p["device_id"], p["ts"]) for p in preds] == [("p", 2000)]  # once, after the abort and retry
    dlq = [v for t, _, v, _ in producer.committed if t == "dlq"]
    assert dlq == [msgs[4].value()]  # the repeated rpm: a duplicate, once
    assert second.stats.aborted == 1
    progress = [json.loads(v or b"") for t, k, v, _ in producer.committed if k == PROGRESS_KEY]
    assert [(d["partition"], d.get("waiting")) for d in progress] == [
        (0, {"waiting": [], "emitted": [["p", 1000], ["p", 2000]]}),
        (1, {"waiting": [["q", 1000, [None, 5.0], [None, Part.of(msgs[3], ("readings", 1, 0)).to_json()]]],
             "emitted": []})]  # q's rpm waits for its temp, in the committed transaction
