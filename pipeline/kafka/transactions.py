"""How a batch's outputs and its input offsets become durable: exactly-once or at-least-once.

:class:`ExactlyOnce` (Kafka transactions, consume-transform-produce, KIP-447), per batch: begin_transaction
-> produce predictions, alerts, dead letters, changelog records -> send_offsets_to_transaction(offsets,
consumer.consumer_group_metadata()) -> commit_transaction.  ``read_committed`` readers see all of a batch or
none of it, and its offsets commit with it.  One producer per process suffices: the group metadata fences a
member that lost its partitions.  An abortable error aborts and ``commit`` returns False (the caller rewinds);
fencing and fatal errors raise :class:`PipelineError` (the worker exits non-zero).

:class:`~liquidstream.pipeline.kafka.at_least_once.AtLeastOnce` (its own module): outputs acknowledged, then the
changelog, then the offsets committed, pipelined across batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from liquidstream.pipeline.errors import KafkaDeliveryError, PipelineError
from liquidstream.pipeline.kafka.output import OutRecord
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.types import TopicPart

log = logging.getLogger("liquidstream.worker")
_Headers = list[tuple[str, str | bytes | None]]  # as Producer.produce takes them
FLUSH_TIMEOUT_S = 30.0  # seconds to wait for every delivery report of a batch
TXN_TIMEOUT_S = 60.0  # seconds for one transactional call (init, send offsets, commit, abort)
TXN_RETRIES = 5  # tries of a transactional call that failed retriably
#: Broker-side limit of an open transaction, ms: a crashed worker's open transaction blocks readers and the
#: group's offset fetch until then, unless a worker with its transactional id starts first.
TRANSACTION_TIMEOUT_MS = 30_000
#: Error codes meaning "another producer took over this transactional id" (librdkafka raises ``_FENCED``).
FENCED_CODES = frozenset(getattr(KafkaError, n) for n in ("_FENCED", "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH"))
RETRY_COMMIT = frozenset(getattr(KafkaError, name) for name in (  # commit again later, don't stop
    "REBALANCE_IN_PROGRESS", "ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "REQUEST_TIMED_OUT", "_TIMED_OUT",
    "COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR", "COORDINATOR_LOAD_IN_PROGRESS", "_TRANSPORT", "_WAIT_COORD"))


def consumer_config(settings: Settings) -> dict[str, Any]:
    """Tunable defaults, then the pass-through client settings, then what the guarantee requires."""
    conf: dict[str, Any] = {"partition.assignment.strategy": "cooperative-sticky"}
    conf.update(settings.kafka_client_config())
    conf.update({"group.id": settings.group_id, "enable.auto.commit": False, "enable.auto.offset.store": False,
                 "auto.offset.reset": settings.auto_offset_reset, "isolation.level": "read_committed"})
    return conf


def producer_config(settings: Settings, transactional_id: str | None = None) -> dict[str, Any]:
    # Delivery reports only for failures: the trackers only look at those, and a Python callback per
    # delivered record costs about a microsecond each at tens of thousands of records per second.
    conf: dict[str, Any] = {"linger.ms": 5, "compression.type": "lz4", "acks": "all",
                            "delivery.report.only.error": True}
    if transactional_id is not None:
        conf["transaction.timeout.ms"] = TRANSACTION_TIMEOUT_MS
    conf.update(settings.kafka_client_config())
    conf["enable.idempotence"] = True  # retries never duplicate or reorder records within a partition
    if transactional_id is not None:
        conf["transactional.id"] = transactional_id
    return conf


def transactional_id(settings: Settings, worker_id: str) -> str:
    return f"{settings.transactional_id_prefix or settings.group_id + '-tx'}-{worker_id}"


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


def produce_all(producer: Producer, records: Sequence[OutRecord], tracker: DeliveryTracker) -> None:
    # Positional arguments (topic, value, key, partition, on_delivery, callback, timestamp, headers; -1: by key;
    # timestamp 0: the producer's clock): parsing keyword arguments costs about a microsecond per record.
    produce = producer.produce
    for i, (topic, key, value, rec_headers, partition, timestamp) in enumerate(records):
        headers = cast("_Headers | None", rec_headers)  # the same list: bytes values are str | bytes values
        where = -1 if partition is None else partition
        while True:
            try:
                produce(topic, value, key, where, tracker, None, timestamp, headers)
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


def describe_offsets(offsets: dict[TopicPart, int]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(offsets.items())) or "(no offsets)"


class Committer:
    """Makes one batch durable; ``commit`` returns False when it aborted (rewind and consume it again)."""

    def start(self) -> None:
        """Called once before subscribing."""

    def commit(self, outputs: Sequence[OutRecord], changelog: Sequence[OutRecord],
               offsets: dict[TopicPart, int], done: Callable[[], None] | None = None) -> bool:
        """Hand a batch over; ``done`` runs once it is durable (before this returns, or from a later call)."""
        raise NotImplementedError

    def settle(self) -> None:
        """Make every batch handed over so far durable now (idle loop turn, shutdown)."""

    def before_revoke(self) -> None:
        """Called in the revoke callback while the partitions are still ours."""

    def forget(self, partitions: set[TopicPart]) -> None:
        """The partitions are gone: drop anything pending for them."""

    def close(self) -> None:
        """Called at shutdown, before the consumer closes."""


class ExactlyOnce(Committer):
    """Kafka transactions: a batch's records and its input offsets commit together or not at all."""

    def __init__(self, producer: Producer, consumer: Consumer, txn_id: str) -> None:
        self.producer, self.consumer, self.txn_id = producer, consumer, txn_id
        self.tracker = DeliveryTracker()  # only explains an abort: the commit's outcome is what counts
        self._open = False

    def start(self) -> None:
        """Fence any earlier producer with this transactional id and finish its open transaction."""
        self._call(lambda: self.producer.init_transactions(TXN_TIMEOUT_S), "init_transactions", "(start-up)")
        log.info("exactly-once: transactional.id %s ready", self.txn_id)

    def commit(self, outputs: Sequence[OutRecord], changelog: Sequence[OutRecord],
               offsets: dict[TopicPart, int], done: Callable[[], None] | None = None) -> bool:
        where = describe_offsets(offsets)
        try:
            self._call(self.producer.begin_transaction, "begin_transaction", where, tries=1)
            self._open = True
            self._call(lambda: produce_all(self.producer, [*outputs, *changelog], self.tracker), "produce", where,
                       tries=1)  # never again: records would be doubled within the transaction
            if offsets:
                tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
                self._call(lambda: self.producer.send_offsets_to_transaction(
                    tps, self.consumer.consumer_group_metadata(), TXN_TIMEOUT_S), "send_offsets", where)
            self._call(lambda: self.producer.commit_transaction(TXN_TIMEOUT_S), "commit_transaction", where)
        except Abortable as ab:
            self.producer.poll(0)  # delivery reports: the first failure usually says why
            why = self.tracker.failures[0] if self.tracker.failures else str(ab)
            log.warning("transaction for %s aborted: %s", where, why)
            self.abort(where)
            return False
        self._done()
        if done is not None:
            done()
        return True

    def abort(self, where: str) -> None:
        self._call(lambda: self.producer.abort_transaction(TXN_TIMEOUT_S), "abort_transaction", where)
        self._done()

    def _done(self) -> None:
        self._open = False
        self.producer.poll(0)  # serve the delivery reports (aborted records' included), then forget them
        self.tracker.failures.clear()

    def _call(self, call: Callable[[], None], what: str, where: str, tries: int = TXN_RETRIES) -> None:
        call_transactional(call, what, where, self._fatal, tries)

    def _fatal(self, err: KafkaError, what: str, where: str) -> PipelineError:
        msg = (f"{what} for {where} failed: producer {self.txn_id} fenced or fatally failed "
               f"({err.str()}); another worker with this transactional id, or a broker-side abort")
        return PipelineError(msg)

    def close(self) -> None:
        if self._open:
            try:
                self.abort("(shutdown)")
            except PipelineError as ex:
                log.error("abort at shutdown failed: %s", ex)


class Abortable(Exception):  # noqa: N818 (a signal to abort, not an error to report)
    """The open transaction must be aborted (message: why); raised by :func:`call_transactional`, caught by the
    owner of the transaction, which aborts it."""


def call_transactional(call: Callable[[], None], what: str, where: str,
                       fatal: Callable[[KafkaError, str, str], Exception], tries: int = TXN_RETRIES) -> None:
    """Run one transactional producer call (``what`` for ``where``, both for messages): retry retriable errors
    up to ``tries`` attempts in all, raise :class:`Abortable` when the broker requires an abort, and
    ``fatal(err, what, where)`` on fencing and fatal errors (the producer is then unusable)."""
    for attempt in range(1, tries + 1):
        try:
            call()
            return
        except KafkaException as ex:
            err: KafkaError = ex.args[0]
            if err.code() in FENCED_CODES or err.fatal():
                raise fatal(err, what, where) from ex
            if err.txn_requires_abort() and what != "abort_transaction":
                raise Abortable(err.str()) from ex
            if not err.retriable() or attempt == tries:
                msg = f"{what} for {where} failed after {attempt} attempt(s): {err.str()}"
                raise PipelineError(msg) from ex
            log.warning("%s for %s: %s (retrying)", what, where, err.str())
            time.sleep(0.1 * attempt)  # seconds
