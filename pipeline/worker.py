"""The Kafka worker's batch step, free of Kafka: consumed messages in, records to produce and offsets out.

:func:`handle_batch` is the whole per-batch logic of ``liquidstream run``: one columnar decode, one
:meth:`LiquidOperator.process` call, then the output records (predictions and alerts keyed by device id,
dead letters keyed by the original key) and the offsets to commit once they are all delivered.  It takes
anything shaped like a ``confluent_kafka.Message`` and touches no client, so it is unit-tested without a
broker; :mod:`pipeline.kafka_io` runs it in the consume/produce/flush/commit loop.

Every consumed message leaves exactly one trace: a prediction, or a dead letter (codec rejects, and the
operator's ``late``/``duplicate`` drops).  So ``consumed == predictions + dead letters`` per batch, which
:class:`Stats` accumulates and checks.  Units: ``ts`` epoch milliseconds on the wire and in records.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from operators.operator import LiquidOperator
from operators.result import EventStatus
from pipeline.codec import DecodeLimits, decode_batch, encode_json
from pipeline.dlq import DeadLetter, Headers
from pipeline.errors import EncodeError, PipelineError
from pipeline.records import SourceCoords, alert_records, prediction_records
from pipeline.schemas import DeadLetterReason

#: (topic, partition) of an input partition.
TopicPart = tuple[str, int]


class MessageLike(Protocol):
    """The part of ``confluent_kafka.Message`` the batch step reads (a consumed data message)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Any: ...


@dataclass(frozen=True)
class OutputTopics:
    predictions: str
    alerts: str
    dlq: str


@dataclass(frozen=True)
class OutRecord:
    """One record to produce: ``Producer.produce(topic, key=, value=, headers=)``."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None


@dataclass
class BatchOutput:
    """What one batch produces and commits; ``commits`` maps each partition to last offset + 1."""

    records: list[OutRecord] = field(default_factory=list)
    commits: dict[TopicPart, int] = field(default_factory=dict)
    consumed: int = 0
    predictions: int = 0
    alerts: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    #: device id -> input partition it was read from (state is partitioned by key)
    device_partitions: dict[str, TopicPart] = field(default_factory=dict)


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
        partition = message.partition()
        where = (message.topic() or "?", -1 if partition is None else partition)
        offset = message.offset() or 0
        lo, hi = spans.get(where, (offset, offset))
        spans[where] = (min(lo, offset), max(hi, offset))
    return ", ".join(f"{t}[{p}]@{lo}..{hi}" for (t, p), (lo, hi) in sorted(spans.items())) or "(empty)"


class DeviceRegistry:
    """Device id -> the input partition its readings come from, so that a revoked partition's devices can
    be dropped from the operator's store (their state now belongs to the partition's new owner)."""

    def __init__(self) -> None:
        self._where: dict[str, TopicPart] = {}

    def __len__(self) -> int:
        return len(self._where)

    def note(self, device_partitions: dict[str, TopicPart]) -> None:
        self._where.update(device_partitions)

    def release(self, partitions: Iterable[TopicPart]) -> list[str]:
        """Forget and return the devices last seen on ``partitions``."""
        gone = set(partitions)
        devices = [d for d, tp in self._where.items() if tp in gone]
        for d in devices:
            del self._where[d]
        return devices


def _drop_detail(status: EventStatus, device_id: str, ts_ms: int) -> tuple[DeadLetterReason, str]:
    if status == EventStatus.LATE_DROPPED:
        return DeadLetterReason.LATE, f"ts {ts_ms} is older than device {device_id!r}'s last applied event"
    return DeadLetterReason.DUPLICATE, f"device {device_id!r} already applied an event at ts {ts_ms}"


def handle_batch(messages: Sequence[MessageLike], operator: LiquidOperator, topics: OutputTopics,
                 limits: DecodeLimits, now_ms: int, worker_id: str | None = None) -> BatchOutput:
    """Decode, process and route one batch of consumed data messages (no Kafka I/O).

    ``now_ms`` is the wall clock, epoch ms, for the codec's future-timestamp check.  The operator's state
    advances; nothing else is touched.  Raises only on bugs (a message without coordinates, an operator
    error on input the codec accepted): the caller must then not commit.
    """
    out = BatchOutput(consumed=len(messages), commits=offsets_to_commit(messages))
    src = [coords(m) for m in messages]
    failed_at = int(now_ms)

    def letter(i: int, reason: DeadLetterReason | str, detail: str) -> None:
        m = messages[i]
        t, p, o = src[i]
        dl = DeadLetter.build(reason, detail, key=m.key(), value=m.value(), topic=t, partition=p, offset=o,
                              worker_id=worker_id, failed_at_ms=failed_at, original_headers=m.headers())
        out.records.append(OutRecord(topics.dlq, dl.key, dl.value, dl.headers))
        out.dead_letters[dl.reason.value] += 1

    decoded = decode_batch([m.value() for m in messages], [m.key() for m in messages], limits, now_ms)
    for rej in decoded.rejects:
        letter(rej.index, rej.reason, rej.detail)
    rows = decoded.index.tolist()  # row k of the decoded columns is input message rows[k]
    result = operator.process(decoded.device_ids, decoded.ts_ms, decoded.values)
    row_src = [src[i] for i in rows]
    for k, rec in prediction_records(decoded.device_ids, result, operator.model_version, row_src):
        try:
            value = encode_json(rec)
        except EncodeError as ex:  # a finite reading whose forecast overflowed: dead-letter it, keep going
            letter(rows[k], DeadLetterReason.NON_FINITE, f"prediction is not finite: {ex}")
            continue
        out.records.append(OutRecord(topics.predictions, rec["device_id"].encode("utf-8"), value))
        out.predictions += 1
    for _, rec in alert_records(result, operator.model_version, row_src, decoded.channels):
        try:
            value = encode_json(rec)
        except EncodeError:
            continue  # its reading already has a prediction; an unencodable alert is only lost signal
        out.records.append(OutRecord(topics.alerts, rec["device_id"].encode("utf-8"), value))
        out.alerts += 1
    for k in np.flatnonzero(~result.applied).tolist():
        reason, detail = _drop_detail(EventStatus(int(result.status[k])), decoded.device_ids[k],
                                      int(decoded.ts_ms[k]))
        letter(rows[k], reason, detail)
    for k, device_id in enumerate(decoded.device_ids):
        out.device_partitions[device_id] = (row_src[k][0], row_src[k][1])
    return out


@dataclass
class Stats:
    """Running counters of a worker; ``consumed == predictions + dead letters`` after every batch."""

    consumed: int = 0
    predictions: int = 0
    alerts: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    skipped_revoked: int = 0  # fetched for a partition revoked meanwhile: left for its new owner
    busy_s: float = 0.0  # seconds spent handling batches (decode to commit)
    started: float = field(default_factory=time.monotonic)
    first_message: float | None = None  # monotonic seconds
    last_commit: float | None = None

    @property
    def late(self) -> int:
        return self.dead_letters[DeadLetterReason.LATE.value]

    @property
    def duplicates(self) -> int:
        return self.dead_letters[DeadLetterReason.DUPLICATE.value]

    @property
    def dead_letter_total(self) -> int:
        return sum(self.dead_letters.values())

    @property
    def balanced(self) -> bool:
        return self.consumed == self.predictions + self.dead_letter_total

    def add(self, out: BatchOutput, busy_s: float) -> None:
        self.consumed += out.consumed
        self.predictions += out.predictions
        self.alerts += out.alerts
        self.dead_letters.update(out.dead_letters)
        self.batches += 1
        self.busy_s += busy_s
        self.last_commit = time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counters; ``events_per_s`` is over the active span (first message to last commit)."""
        now = time.monotonic()
        active = (self.last_commit or now) - (self.first_message or now)
        return {"consumed": self.consumed, "predictions": self.predictions, "alerts": self.alerts,
                "dead_letters": self.dead_letter_total,
                "dead_letters_by_reason": dict(sorted(self.dead_letters.items())),
                "late": self.late, "duplicates": self.duplicates, "batches": self.batches,
                "skipped_revoked": self.skipped_revoked, "balanced": self.balanced,
                "uptime_s": round(now - self.started, 3), "active_s": round(active, 3),
                "busy_s": round(self.busy_s, 3),
                "events_per_s": round(self.consumed / active, 1) if active > 0 else None,
                "busy_events_per_s": round(self.consumed / self.busy_s, 1) if self.busy_s > 0 else None}
