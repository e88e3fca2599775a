"""The model-updates topic: creating it, the consumer that reads it outside any group, and reading it whole.

One partition keeps a lineage's records in order; compaction keeps the newest record per key, so a process
that starts later still finds the latest update.  The trainer reads the topic to its end at start-up
(:func:`read_latest`), after its publisher fenced older trainers of the lineage
(:mod:`liquidstream.pipeline.updates.publisher`), to continue its lineage's numbering; serving workers follow it with
:class:`liquidstream.pipeline.updates.follower.ModelFollower`.  Both read ``read_committed``: the records of an aborted
transaction (a fenced trainer's) are never seen.  Timeouts are seconds.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from liquidstream.operators.forecaster import Forecaster
from liquidstream.pipeline.errors import ConfigurationError, PipelineError
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.gate import UpdateGate
from liquidstream.pipeline.updates.record import (
    MAX_RECORD_BYTES,
    Envelope,
    ModelUpdate,
    RejectReason,
    UpdateRejected,
    check_compatible,
    decode,
)
from liquidstream.pipeline.wire.types import HeadersLike

__all__ = ["assign_from_start", "ensure_updates_topic", "read_latest", "updates_consumer", "where"]
log = logging.getLogger("liquidstream.model_updates")
ADMIN_TIMEOUT_S = 30.0  # seconds for topic metadata and creation
READ_TIMEOUT_S = 30.0  # seconds to read the updates topic to its end at trainer start-up
POLL_MESSAGES = 64  # records screened per consumer call


def _led(admin: AdminClient, topic: str) -> bool:
    """The topic exists and every partition has a leader."""
    meta = admin.list_topics(topic=topic, timeout=ADMIN_TIMEOUT_S).topics.get(topic)
    return meta is not None and meta.error is None and bool(meta.partitions) and \
        all(p.leader >= 0 for p in meta.partitions.values())


def ensure_updates_topic(admin: AdminClient, topic: str) -> None:
    """Create the updates topic if missing: one partition (a lineage's records stay ordered), compacted;
    return once its partition has a leader."""
    if _led(admin, topic):
        return
    new = NewTopic(topic, num_partitions=1, replication_factor=-1,
                   config={"cleanup.policy": "compact", "max.message.bytes": str(MAX_RECORD_BYTES)})
    try:
        admin.create_topics([new])[topic].result(ADMIN_TIMEOUT_S)
        log.info("created model-updates topic %s (1 partition, compacted)", topic)
    except KafkaException as ex:
        if ex.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another process was quicker: fine
            msg = f"cannot create model-updates topic {topic}: {ex}"
            raise PipelineError(msg) from ex
    deadline = time.monotonic() + ADMIN_TIMEOUT_S
    while not _led(admin, topic):  # created moments ago: in the metadata before a broker leads it
        if time.monotonic() > deadline:
            msg = f"model-updates topic {topic} has no partition leader after {ADMIN_TIMEOUT_S} s"
            raise PipelineError(msg)
        time.sleep(0.1)


def updates_consumer(settings: Settings, purpose: str) -> Consumer:
    """A consumer outside any group (assign only, never commits) for the updates topic; ``read_committed``,
    so that an update whose transaction a newer trainer aborted (fencing) is never adopted nor counted."""
    return Consumer(settings.kafka_client_config() | {
        "group.id": f"{settings.group_id}-{purpose}", "enable.auto.commit": False, "auto.offset.reset": "earliest",
        "isolation.level": "read_committed", "enable.partition.eof": True, "fetch.wait.max.ms": 10})


def assign_from_start(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=ADMIN_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        msg = f"model-updates topic {topic} does not exist"
        raise ConfigurationError(msg)
    partitions = sorted(meta.partitions)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    return partitions


def record_headers(m: Message) -> HeadersLike:
    """``m``'s headers; :class:`UpdateRejected` (malformed) when the client cannot read them.  A header name
    that is not UTF-8 makes confluent-kafka raise ``SystemError``: on the updates topic, which every serving
    worker reads from its beginning at each start, that would stop the fleet at every restart."""
    try:
        return m.headers()
    except (SystemError, UnicodeDecodeError) as ex:
        cause = ex.__cause__ or ex.__context__ or ex
        raise UpdateRejected(RejectReason.MALFORMED, f"headers unreadable: {cause}") from ex


def where(m: Message) -> str:
    return f"{m.topic()}[{m.partition()}]@{m.offset()}"


def read_latest(consumer: Consumer, topic: str, gate: UpdateGate, serving: Forecaster | None,
                timeout_s: float = READ_TIMEOUT_S) -> tuple[ModelUpdate | None, int]:
    """Read the whole topic: the newest update ``gate`` accepts (or None) and the highest *verified* seq of the
    lineage (so a trainer continues the numbering even when that record does not fit its model)."""
    partitions = assign_from_start(consumer, topic)
    try:
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
                for p in partitions}
    except KafkaException as ex:
        msg = f"cannot read the end offsets of model-updates topic {topic}: {ex}"
        raise PipelineError(msg) from ex
    todo, found, top_seq = {p for p, end in ends.items() if end > 0}, list[Envelope](), 0
    deadline = time.monotonic() + timeout_s
    while todo:
        if time.monotonic() > deadline:
            msg = f"reading model-updates topic {topic}: partitions {sorted(todo)} not read to their end in time"
            raise PipelineError(msg)
        for m in consumer.consume(num_messages=POLL_MESSAGES, timeout=0.2):
            err, p = m.error(), m.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    todo.discard(p)
                continue
            if (m.offset() or 0) + 1 >= ends.get(p, 0):
                todo.discard(p)
            try:
                env = gate.screen(m.value(), record_headers(m), None)
            except UpdateRejected as ex:
                log.warning("ignoring %s: %s", where(m), ex)
                continue
            top_seq = max(top_seq, env.seq)
            found.append(env)
    for env in sorted(found, key=lambda e: e.seq, reverse=True):
        try:
            if serving is not None:
                check_compatible(env, serving)
            return decode(env), top_seq
        except UpdateRejected as ex:
            log.warning("latest model update not usable: %s", ex)
    return None, top_seq
