"""Model updates through Kafka: the compacted topic, the trainer's publisher, the serving worker's follower.

Record format and signature: :mod:`pipeline.model_record`.  :class:`UpdateGate` decides what a process may
adopt: a record must be signed with this process's key, of its lineage, with a ``seq`` above the model it
serves (an older record replayed is *stale*), of the same architecture, and decode to weights that hash to
the version it claims.  :class:`ModelFollower` is the serving worker's side: a consumer outside any group,
assigned every partition of the topic from the beginning (a restarted worker finds the latest compacted
update), polled without blocking *between* batches; per poll it screens the new records cheaply (signature,
header, order) and fully decodes at most one, the newest.  Every adoption and rejection is logged and counted
(``liquidstream_model_updates_total{result, reason}``).

>>> import torch
>>> from operators.forecaster import Forecaster
>>> from pipeline.model_record import build_record
>>> torch.manual_seed(0) and None
>>> served = Forecaster(n_channels=2, hidden_size=4, cell="liquid")
>>> gate = UpdateGate(b"k" * 16, "demo")
>>> rec = build_record(served.state_dict(), served.config(), seq=3, lineage="demo", signing_key=b"k" * 16)
>>> gate.adopt(gate.screen(rec.value, rec.headers, served)).seq, gate.seq
(3, 3)
>>> gate.screen(rec.value, rec.headers, served)
Traceback (most recent call last):
...
pipeline.model_record.UpdateRejected: model update rejected (stale): seq 3 is not above the served seq 3
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from operators.forecaster import Forecaster
from pipeline.errors import ConfigurationError, KafkaDeliveryError, PipelineError
from pipeline.metrics import Metrics
from pipeline.model_record import (
    MAX_RECORD_BYTES,
    Envelope,
    HeadersLike,
    ModelUpdate,
    RejectReason,
    UpdateRecord,
    UpdateRejected,
    check_compatible,
    decode,
    signing_key,
    verify,
)
from pipeline.settings import Settings
from pipeline.transactions import FLUSH_TIMEOUT_S, DeliveryTracker, producer_config

__all__ = ["ModelFollower", "UpdateGate", "UpdatePublisher", "ensure_updates_topic", "read_latest"]
log = logging.getLogger("liquidstream.model_updates")
ADMIN_TIMEOUT_S = 30.0  # seconds for topic metadata and creation
READ_TIMEOUT_S = 30.0  # seconds to read the updates topic to its end at trainer start-up
POLL_MESSAGES = 64  # records screened per follower poll (only the newest valid one is decoded)


class UpdateGate:
    """Signature, lineage, order and architecture checks, and the ``seq`` of the model being served
    (0: a model from a file, which any valid update of the lineage supersedes)."""

    def __init__(self, key: bytes | None, lineage: str, seq: int = 0) -> None:
        self.key, self.lineage, self.seq = key, lineage, seq

    def screen(self, value: bytes | None, headers: HeadersLike, serving: Forecaster | None) -> Envelope:
        """Everything short of decoding the weights (``serving`` None: any architecture)."""
        env = verify(value, headers, self.key)
        if env.lineage != self.lineage:
            raise UpdateRejected(RejectReason.OTHER_LINEAGE, f"lineage {env.lineage!r}, following {self.lineage!r}")
        if env.seq <= self.seq:
            raise UpdateRejected(RejectReason.STALE, f"seq {env.seq} is not above the served seq {self.seq}")
        if serving is not None:
            check_compatible(env, serving)
        return env

    def adopt(self, envelope: Envelope) -> ModelUpdate:
        """Decode a screened envelope; on success its seq becomes the served one."""
        update = decode(envelope)
        self.seq = update.seq
        return update


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
    """A consumer outside any group (assign only, never commits) for the updates topic."""
    return Consumer(settings.kafka_client_config() | {
        "group.id": f"{settings.group_id}-{purpose}", "enable.auto.commit": False, "auto.offset.reset": "earliest",
        "isolation.level": "read_committed", "enable.partition.eof": True, "fetch.wait.max.ms": 10})


def _assign_from_start(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=ADMIN_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        msg = f"model-updates topic {topic} does not exist"
        raise ConfigurationError(msg)
    partitions = sorted(meta.partitions)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    return partitions


def _where(m: Message) -> str:
    return f"{m.topic()}[{m.partition()}]@{m.offset()}"


def read_latest(consumer: Consumer, topic: str, gate: UpdateGate, serving: Forecaster | None,
                timeout_s: float = READ_TIMEOUT_S) -> tuple[ModelUpdate | None, int]:
    """Read the whole topic: the newest update ``gate`` accepts (or None) and the highest *verified* seq of the
    lineage (so a trainer continues the numbering even when that record does not fit its model)."""
    partitions = _assign_from_start(consumer, topic)
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
                env = gate.screen(m.value(), m.headers(), None)
            except UpdateRejected as ex:
                log.warning("ignoring %s: %s", _where(m), ex)
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


class UpdatePublisher:
    """Idempotent producer of signed updates; :meth:`publish` returns once the broker acknowledged."""

    def __init__(self, settings: Settings, producer: Producer | None = None) -> None:
        self.topic = settings.model_updates_topic
        self.producer = producer or Producer(producer_config(settings) | {"message.max.bytes": MAX_RECORD_BYTES})
        self.tracker = DeliveryTracker()

    def publish(self, record: UpdateRecord) -> None:
        self.producer.produce(self.topic, record.value, record.key, headers=list(record.headers),
                              on_delivery=self.tracker)
        if left := self.producer.flush(FLUSH_TIMEOUT_S):
            raise KafkaDeliveryError(self.topic, f"model update seq {record.seq} unacknowledged ({left} left)")
        self.tracker.check()
        log.info("published model update seq %d version %s to %s", record.seq, record.version, self.topic)


class ModelFollower:
    """The serving worker's view of the updates topic; :meth:`poll` between batches, never inside one."""

    def __init__(self, settings: Settings, metrics: Metrics, *, consumer: Consumer | None = None,
                 ensure_topic: Callable[[], None] | None = None) -> None:
        self.topic, self.metrics = settings.model_updates_topic, metrics
        self.gate = UpdateGate(signing_key(settings.model_signing_key), settings.model_lineage)
        self.consumer = consumer or updates_consumer(settings, "model-updates")
        self._ensure = ensure_topic or (lambda: ensure_updates_topic(AdminClient(settings.kafka_client_config()),
                                                                     self.topic))
        self.counts: Counter[str] = Counter()
        if self.gate.key is None:
            log.warning("following %s without LIQUIDSTREAM_MODEL_SIGNING_KEY: every update will be rejected",
                        self.topic)

    def start(self) -> None:
        self._ensure()
        _assign_from_start(self.consumer, self.topic)
        log.info("following model updates of lineage %r on %s", self.gate.lineage, self.topic)

    def poll(self, serving: Forecaster) -> ModelUpdate | None:
        """Screen what arrived since the last poll (no waiting); decode and return the newest valid update."""
        best: tuple[Envelope, Message] | None = None
        for m in self.consumer.consume(num_messages=POLL_MESSAGES, timeout=0):
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("model-updates consumer error on %s: %s", _where(m), err.str())
                continue
            try:
                env = self.gate.screen(m.value(), m.headers(), serving)
            except UpdateRejected as ex:
                self._reject(m, ex)
                continue
            if best is not None:
                self.counts["superseded"] += 1  # a newer valid record arrived in the same poll
            if best is None or env.seq > best[0].seq:
                best = (env, m)
        if best is None:
            return None
        try:
            update = self.gate.adopt(best[0])
        except UpdateRejected as ex:
            self._reject(best[1], ex)
            return None
        self.counts["adopted"] += 1
        self.metrics.model_update("adopted", "ok")
        log.info("adopting model update seq %d version %s (parent %s, trainer %s, validation %s) from %s",
                 update.seq, update.version, update.parent_version, update.trainer, update.validation,
                 _where(best[1]))
        return update

    def _reject(self, m: Message, ex: UpdateRejected) -> None:
        self.counts[f"rejected_{ex.reason.value}"] += 1
        self.metrics.model_update("rejected", ex.reason.value)
        log.warning("rejected model update at %s: %s", _where(m), ex)

    def stats(self) -> dict[str, Any]:
        rejected = {k.removeprefix("rejected_"): v for k, v in sorted(self.counts.items()) if k.startswith("rej")}
        return {"adopted": self.counts["adopted"], "rejected": sum(rejected.values()),
                "rejected_by_reason": rejected, "superseded": self.counts["superseded"], "seq": self.gate.seq}

    def close(self) -> None:
        try:
            self.consumer.close()
        except KafkaException as ex:
            log.error("model-updates consumer close failed: %s", ex)
