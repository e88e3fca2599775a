"""The Kafka worker's batch step, free of Kafka: consumed messages in, records to produce and offsets out.

:func:`handle_batch` is the per-batch logic of ``liquidstream run`` (run by :mod:`liquidstream.pipeline.kafka.worker`):
one columnar decode, one :meth:`LiquidOperator.process` call, the output records (predictions and alerts keyed by device
id, dead letters by the original key) and the offsets to commit with them.  No client: unit-tested.

Every consumed message leaves exactly one trace: a prediction or a dead letter (codec rejects, and the
operator's ``late``/``duplicate`` drops), so ``consumed == predictions + dead letters`` (:class:`Stats`).
Units: ``ts`` epoch milliseconds on the wire and in records.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

import numpy as np

from liquidstream.operators.operator import LiquidOperator
from liquidstream.operators.result import Alert, AlertClosed, EventStatus
from liquidstream.pipeline.errors import EncodeError, PipelineError
from liquidstream.pipeline.kafka.long_input import Part, StreamAssembly, kafka_timestamp
from liquidstream.pipeline.kafka.output import BatchOutput, OutputTopics, OutRecord
from liquidstream.pipeline.wire.codec import DecodeLimits, decode_batch, encode_json
from liquidstream.pipeline.wire.contract import schema_headers
from liquidstream.pipeline.wire.dead_letters import DeadLetter
from liquidstream.pipeline.wire.records import (
    alert_records,
    closed_record,
    encode_predictions,
    opened_record,
    prediction_records,
)
from liquidstream.pipeline.wire.schemas import DeadLetterReason
from liquidstream.pipeline.wire.types import MessageLike, SourceCoords, TopicPart

__all__ = ["coords", "describe_range", "eviction_closes", "handle_batch", "offsets_to_commit", "silence_record",
           "tune_gc"]

#: Every prediction and alert names its published schema and version (shared lists: never mutated).
_PREDICTION_HEADERS, _ALERT_HEADERS = schema_headers("prediction"), schema_headers("alert")


def tune_gc() -> None:
    """Call once before the consume loop: hide the start-up heap from the cyclic garbage collector.

    Every batch allocates tens of thousands of short-lived objects (records, tuples, bytes), which trigger
    collections; an older-generation collection then walks every object alive, most of them torch's and
    the clients' start-up objects.  ``gc.freeze()`` moves those to a generation that is never scanned, and a
    larger young-generation threshold makes young collections rarer.  Measured on the worker's changelog
    step: 34 -> 14 us per device record (``gc.disable()``: 11).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def coords(message: MessageLike) -> SourceCoords:
    """(topic, partition, offset) of a consumed data message; a message without them is a bug upstream."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None or offset < 0:
        msg = f"message without coordinates: topic={topic!r} partition={partition} offset={offset}"
        raise PipelineError(msg)
    return topic, partition, offset


def offsets_to_commit(messages: Iterable[MessageLike]) -> dict[TopicPart, int]:
    """Per partition, the offset to commit after processing ``messages``: the highest offset + 1."""
    out: dict[TopicPart, int] = {}
    for message in messages:
        topic, partition, offset = coords(message)
        out[(topic, partition)] = max(out.get((topic, partition), 0), offset + 1)
    return out


def describe_range(messages: Iterable[MessageLike]) -> str:
    """``readings[0]@10..52, readings[3]@7..7``: the partitions and offsets of a batch, for error logs."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for message in messages:
        partition, offset = message.partition(), message.offset() or 0
        where = (message.topic() or "?", -1 if partition is None else partition)
        lo, hi = spans.get(where, (offset, offset))
        spans[where] = (min(lo, offset), max(hi, offset))
    return ", ".join(f"{t}[{p}]@{lo}..{hi}" for (t, p), (lo, hi) in sorted(spans.items())) or "(empty)"


def _drop_detail(status: EventStatus, device_id: str, ts_ms: int) -> tuple[DeadLetterReason, str]:
    if status == EventStatus.LATE_DROPPED:
        return DeadLetterReason.LATE, f"ts {ts_ms} is older than device {device_id!r}'s last applied event"
    return DeadLetterReason.DUPLICATE, f"device {device_id!r} already applied an event at ts {ts_ms}"


def handle_batch(messages: Sequence[MessageLike], operator: LiquidOperator, topics: OutputTopics,
                 limits: DecodeLimits, now_ms: int, worker_id: str | None = None,
                 before_process: Callable[[Sequence[str]], None] | None = None,
                 assembly: StreamAssembly | None = None) -> BatchOutput:
    """Decode, process and route one batch of consumed data messages (no Kafka I/O).

    ``now_ms``: wall clock, epoch ms, for the future-timestamp check.  Only the operator's state changes (and
    ``assembly``'s: the long input shape, whose parts may wait for a later batch or be dead-lettered from an
    earlier one); ``before_process`` sees the decoded device ids just before (to snapshot them:
    :class:`StateUndo`).  Raises only on bugs (no coordinates, an operator error on accepted input): then do not
    commit.  Dead letters carry their input message's Kafka timestamp (``topics.event_time``).
    """
    raw = [(m.topic(), m.partition(), m.offset()) for m in messages]  # checked as coords() does, in one pass
    if any(t is None or p is None or o is None or o < 0 for t, p, o in raw):
        raw = [coords(m) for m in messages]  # raises, naming the message
    src = cast("list[SourceCoords]", raw)
    commits: dict[TopicPart, int] = {}
    for topic, partition, offset in src:  # offsets rise within a partition, but a batch may interleave them
        if offset >= commits.get((topic, partition), 0):
            commits[(topic, partition)] = offset + 1
    out = BatchOutput(consumed=len(messages), commits=commits)

    def letter(i: int, reason: DeadLetterReason | str, detail: str) -> None:
        m = messages[i]
        post(Part(*src[i], m.key(), m.value(), kafka_timestamp(m), m.headers), reason, detail)

    def post(part: Part, reason: DeadLetterReason | str, detail: str) -> None:
        dl = DeadLetter.build(reason, detail, key=part.key, value=part.value, topic=part.topic,
                              partition=part.partition, offset=part.offset, worker_id=worker_id,
                              failed_at_ms=int(now_ms), original_headers=part.headers, max_bytes=topics.dlq_max_bytes)
        out.records.append(OutRecord(topics.dlq, dl.key, dl.value, dl.headers, None,
                                     part.timestamp_ms if topics.event_time else 0))
        out.dead_letters[dl.reason.value] += 1

    if assembly is None:
        decoded = decode_batch([m.value() for m in messages], [m.key() for m in messages], limits, now_ms)
        for rej in decoded.rejects:
            letter(rej.index, rej.reason, rej.detail)
    else:
        decoded, given_up = assembly.decode(messages, src, now_ms)
        for part, reason, detail in given_up:
            post(part, reason, detail)
    rows = decoded.index.tolist()  # row k of the decoded columns is input message rows[k]
    if before_process is not None:
        before_process(decoded.device_ids)
    result = operator.process(decoded.device_ids, decoded.ts_ms, decoded.values)
    row_src, published = [src[i] for i in rows], list[int]()
    keys = {d: d.encode("utf-8") for d in decoded.device_ids}  # once per device, not per event
    predictions, append, ids = topics.predictions, out.records.append, decoded.device_ids
    times = result.ts_ms.tolist() if topics.event_time else [0] * len(ids)
    slow: list[int] = []
    for k, value in encode_predictions(ids, result, operator.model_version, row_src):
        if value is None:
            slow.append(k)
            continue
        append(OutRecord(predictions, keys[ids[k]], value, _PREDICTION_HEADERS, None, times[k]))
        published.append(k)
    if slow:  # not finite (an overflowed forecast): the checking encoder says why, the reading is dead-lettered
        records = dict(prediction_records(ids, result, operator.model_version, row_src))
        for k in slow:
            try:
                append(OutRecord(predictions, keys[ids[k]], encode_json(records[k]), _PREDICTION_HEADERS, None,
                                 times[k]))
                published.append(k)
            except EncodeError as ex:
                letter(rows[k], DeadLetterReason.NON_FINITE, f"prediction is not finite: {ex}")
        published.sort()
    out.predictions, out.event_ts_ms = len(published), result.ts_ms[published]
    out.late = int(np.isin(result.status, (EventStatus.LATE_DROPPED, EventStatus.LATE_ACCEPTED)).sum())
    for _, rec in alert_records(result, operator.model_version, row_src, decoded.channels):
        try:
            value = encode_json(rec)
        except EncodeError:
            continue  # its reading already has a prediction; an unencodable alert is only lost signal
        out.records.append(OutRecord(topics.alerts, rec["device_id"].encode("utf-8"), value, _ALERT_HEADERS, None,
                                     rec["ts"] if topics.event_time else 0))
        out.alerts += rec["event"] == "opened"  # the alerts metric counts incidents
    for k in np.flatnonzero(~result.applied).tolist():
        reason, detail = _drop_detail(EventStatus(int(result.status[k])), decoded.device_ids[k],
                                      int(decoded.ts_ms[k]))
        letter(rows[k], reason, detail)
    out.device_partitions.update((d, (t, p)) for d, (t, p, _) in zip(decoded.device_ids, row_src, strict=True))
    return out


def eviction_closes(closings: Iterable[AlertClosed], where: Mapping[str, TopicPart], positions: Mapping[TopicPart, int],
                    topics: OutputTopics, model_version: str) -> list[OutRecord]:
    """The ``closed`` records (``closed_by`` ``evicted``) of alerts open on devices being evicted; ``where``: each
    device's input partition, ``positions``: the next offset per partition (the source is the last one read)."""
    out = []
    for closed in closings:
        tp = where.get(closed.device_id)
        if tp is None:
            continue  # a device this worker never read (a commissioning row only): nothing was published for it
        rec = closed_record(closed, model_version)
        out.append(_off_batch(rec, closed.device_id, closed.ts_ms, tp, positions, topics))
    return out


def silence_record(alert: Alert, tp: TopicPart, positions: Mapping[TopicPart, int], topics: OutputTopics,
                   model_version: str) -> OutRecord:
    """The ``opened`` record of a silence the worker's timer found on partition ``tp``."""
    return _off_batch(opened_record(alert, model_version), alert.device_id, alert.ts_ms, tp, positions, topics)


def _off_batch(rec: dict[str, object], device_id: str, ts_ms: int, tp: TopicPart,
               positions: Mapping[TopicPart, int], topics: OutputTopics) -> OutRecord:
    """An alert record decided outside a batch: its source is the last input offset read on its partition."""
    rec["source"] = {"topic": tp[0], "partition": tp[1], "offset": max(positions.get(tp, 1) - 1, 0)}
    return OutRecord(topics.alerts, device_id.encode("utf-8"), encode_json(rec), _ALERT_HEADERS, None,
                     ts_ms if topics.event_time else 0)
