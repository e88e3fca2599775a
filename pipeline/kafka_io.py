"""The Kafka side of ``liquidstream run``: consume a batch, process it, produce, flush, then commit.

Per batch, in this order (at-least-once)::

    consume(num_messages, timeout)  ->  handle_batch (one decode, one operator call)
    ->  produce predictions, alerts, dead letters  ->  flush() and check every delivery report
    ->  commit the batch's offsets (last offset + 1 per partition), synchronously

Offsets are committed only for records that Kafka acknowledged, so a crash anywhere re-delivers the batch
(duplicates possible, gaps not).  Rebalance callbacks run inside ``consume()``/``close()``, between batches,
when all that was processed is flushed; a commit that failed retriably (rebalance in progress) is retried
there before the partitions go.  Revoked or lost partitions' devices are dropped from the operator's store:
their state belongs to the new owner (state hand-over is a later issue).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from operators.operator import LiquidOperator
from pipeline import worker as step
from pipeline.codec import DecodeLimits
from pipeline.errors import KafkaDeliveryError, PipelineError
from pipeline.settings import Settings
from pipeline.worker import TopicPart

log = logging.getLogger("liquidstream.worker")
_Headers = list[tuple[str, str | bytes | None]]  # as Producer.produce takes them
STATS_EVERY_S = 10.0  # seconds between periodic stats lines
FLUSH_TIMEOUT_S = 30.0  # seconds to wait for every delivery report of a batch
_RETRY_COMMIT = frozenset(getattr(KafkaError, name) for name in (  # commit again later, don't stop
    "REBALANCE_IN_PROGRESS", "ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "REQUEST_TIMED_OUT", "_TIMED_OUT",
    "COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR", "COORDINATOR_LOAD_IN_PROGRESS", "_TRANSPORT",
    "_WAIT_COORD"))


def consumer_config(settings: Settings) -> dict[str, Any]:
    """Tunable defaults, then the pass-through client settings, then what at-least-once requires."""
    conf: dict[str, Any] = {"partition.assignment.strategy": "cooperative-sticky"}
    conf.update(settings.kafka_client_config())
    conf.update({"group.id": settings.group_id, "enable.auto.commit": False,
                 "enable.auto.offset.store": False, "auto.offset.reset": settings.auto_offset_reset})
    return conf


def producer_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {"linger.ms": 5, "compression.type": "lz4", "acks": "all"}
    conf.update(settings.kafka_client_config())
    conf["enable.idempotence"] = True  # retries never duplicate or reorder records within a partition
    return conf


class DeliveryTracker:
    """Delivery-report callback that remembers failures until :meth:`check`."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, int | None, str]] = []

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failures.append((message.topic() or "?", message.partition(), error.str()))

    def check(self) -> None:
        if self.failures:
            (topic, partition, reason), count = self.failures[0], len(self.failures)
            self.failures.clear()
            raise KafkaDeliveryError(topic, f"{reason} ({count} record(s) failed)", partition=partition)


def produce_all(producer: Producer, records: Sequence[step.OutRecord], tracker: DeliveryTracker) -> None:
    for i, rec in enumerate(records):
        headers: _Headers | None = None if rec.headers is None else list(rec.headers)
        while True:
            try:
                producer.produce(rec.topic, rec.value, rec.key, headers=headers, on_delivery=tracker)
                break
            except BufferError:  # local queue full: serve delivery reports until there is room
                producer.poll(0.05)
        if i % 1000 == 999:
            producer.poll(0)


def flush_checked(producer: Producer, tracker: DeliveryTracker, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
    """Wait for every queued record; raise :class:`KafkaDeliveryError` unless all were acknowledged."""
    left = producer.flush(timeout_s)
    if left:
        topic, msg = "(outputs)", f"{left} record(s) still unacknowledged after {timeout_s} s"
        raise KafkaDeliveryError(topic, msg)
    tracker.check()


class KafkaWorker:
    """One consumer-group member running the operator over its partitions until stopped or idle."""

    def __init__(self, settings: Settings, operator: LiquidOperator, *, worker_id: str,
                 consumer: Consumer | None = None, producer: Producer | None = None) -> None:
        """``consumer``/``producer`` replace the clients built from ``settings`` (tests)."""
        self.settings, self.operator, self.worker_id = settings, operator, worker_id
        self.topics = step.OutputTopics(settings.predictions_topic, settings.alerts_topic, settings.dlq_topic)
        self.limits = DecodeLimits.from_settings(settings, operator.n_channels)
        self.stats = step.Stats()
        self.registry = step.DeviceRegistry()
        self.tracker = DeliveryTracker()
        self.consumer = consumer or Consumer(consumer_config(settings))
        self.producer = producer or Producer(producer_config(settings))
        self._assigned: set[TopicPart] = set()
        self._uncommitted: dict[TopicPart, int] = {}  # delivered but not yet committed (retriable failure)
        self._stop_reason: str | None = None
        self._last_activity = self._last_stats = time.monotonic()
        self._warned: dict[int, float] = {}

    def stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Signal handler: finish the current batch, flush, commit, close, exit 0."""
        self._stop_reason = f"signal {signum}" if signum is not None else "stop requested"

    def run(self) -> int:
        s = self.settings
        self.consumer.subscribe([s.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        log.info("worker %s consuming %s as group %s (batches of <= %d messages / %d ms)", self.worker_id,
                 s.input_topic, s.group_id, s.batch_max_messages, s.batch_max_ms)
        code, batch = 0, list[Message]()
        try:
            while self._stop_reason is None:
                batch = []  # so that an error in consume() is not reported against the previous batch
                batch = self._data(self.consumer.consume(num_messages=s.batch_max_messages,
                                                         timeout=s.batch_max_ms / 1000.0))
                if batch:
                    self._handle(batch)
                elif s.exit_when_idle_s is not None and \
                        time.monotonic() - self._last_activity >= s.exit_when_idle_s:
                    self._stop_reason = f"idle for {s.exit_when_idle_s} s"
                self._maybe_log_stats()
        except (PipelineError, KafkaException) as ex:
            log.error("stopping: %s (batch %s not committed)", ex, step.describe_range(batch))
            code = 2
        except Exception:  # a bug: never commit what it may have mangled, so nothing is lost
            log.exception("bug in batch %s; exiting without committing it", step.describe_range(batch))
            code = 1
        self._close(code)
        return code

    def _data(self, messages: list[Message]) -> list[Message]:
        """The data messages of partitions still assigned; consumer errors handled here."""
        data: list[Message] = []
        for m in messages:
            err = m.error()
            if err is None:
                if (m.topic(), m.partition()) in self._assigned:
                    data.append(m)
                else:
                    self.stats.skipped_revoked += 1
            elif err.fatal():
                msg = f"fatal consumer error on {m.topic()}[{m.partition()}]: {err.str()}"
                raise PipelineError(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                self._warn(err.code(), "consumer error on %s[%s]: %s", m.topic(), m.partition(), err.str())
        return data

    def _handle(self, batch: list[Message]) -> None:
        t0 = time.monotonic()
        if self.stats.first_message is None:
            self.stats.first_message = t0
        out = step.handle_batch(batch, self.operator, self.topics, self.limits, time.time_ns() // 1_000_000,
                           self.worker_id)
        produce_all(self.producer, out.records, self.tracker)
        flush_checked(self.producer, self.tracker)
        self.registry.note(out.device_partitions)
        self._commit(out.commits)
        self.stats.add(out, time.monotonic() - t0)
        self._last_activity = time.monotonic()

    def _commit(self, offsets: dict[TopicPart, int]) -> None:
        pending = dict(self._uncommitted)
        for tp, offset in offsets.items():
            pending[tp] = max(offset, pending.get(tp, 0))
        pending = {tp: o for tp, o in pending.items() if tp in self._assigned}  # a revoked one is not ours
        self._uncommitted = {}
        if not pending:
            return
        where = ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(pending.items()))
        try:
            result = self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in pending.items()],
                                          asynchronous=False)
            errors = [(tp.topic, tp.partition, tp.error) for tp in result if tp.error is not None]
        except KafkaException as ex:
            errors = [(t, p, ex.args[0]) for t, p in pending]
        for topic, partition, err in errors:
            if not isinstance(err, KafkaError) or not (err.code() in _RETRY_COMMIT or err.retriable()):
                group = self.settings.group_id
                msg = f"commit of {where} (group {group}) failed on {topic}[{partition}]: {err}"
                raise PipelineError(msg)
            self._warn(err.code(), "commit of %s[%s] deferred: %s", topic, partition, err.str())
            self._uncommitted[(topic, partition)] = pending[(topic, partition)]

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        self._last_activity = time.monotonic()
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            self._commit({})  # offsets delivered but not yet committed, while the partitions are still ours
        except PipelineError as ex:
            log.error("commit before revocation failed: %s", ex)
        self._release(partitions, "revoked")

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "lost")  # no commit: another member may own them already

    def _release(self, partitions: list[TopicPartition], how: str) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned -= gone
        for tp in gone:
            self._uncommitted.pop(tp, None)
        dropped = self.operator.store.drop(self.registry.release(gone))
        names = sorted(f"{t}[{p}]" for t, p in gone)
        log.info("%s %s; dropped the state of %d device(s)", how, names, len(dropped))

    def _close(self, code: int) -> None:
        log.info("shutting down (%s)", self._stop_reason or f"exit code {code}")
        try:
            self.consumer.close()  # leaves the group; the revoke callback commits anything deferred
        except KafkaException as ex:
            log.error("consumer close failed: %s", ex)
        left = self.producer.flush(FLUSH_TIMEOUT_S)
        if left:
            log.error("%d output record(s) not delivered at shutdown", left)
        final = self.stats.as_dict() | {"final": True, "exit_code": code, "worker": self.worker_id}
        log.info("final stats %s", json.dumps(final))
        print(json.dumps(final), flush=True)  # stdout: one JSON line, for scripts and tests

    def _maybe_log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= STATS_EVERY_S:
            self._last_stats = now
            # Idle-device eviction by *event* time (the newest event seen), so replaying old data through
            # Kafka does not evict everything at once.
            if len(self.operator.store):
                evicted = self.operator.evict_idle(int(self.operator.store.host["last_ts_ms"].max()))
                if evicted:
                    log.info("evicted %d idle device(s) (state_ttl_s=%s)", len(evicted),
                             self.settings.operator.state_ttl_s)
            log.info("stats %s", json.dumps(self.stats.as_dict() | {"devices": len(self.operator.store)}))

    def _warn(self, code: int, fmt: str, *args: object) -> None:
        now = time.monotonic()  # a recurring client error: logged at most once per interval per code
        if now - self._warned.get(code, -STATS_EVERY_S) >= STATS_EVERY_S:
            self._warned[code] = now
            log.warning(fmt, *args)
