"""The trainer's side of the model-updates topic: a transactional publisher that fences other trainers.

Two trainers of one lineage would both continue the numbering from the topic and publish competing records
with the same ``seq``; serving workers keep whichever arrives first and the other trainer goes on training a
model nobody serves.  Kafka's own fencing prevents that.  The publisher's ``transactional.id`` is derived
from the topic and the lineage (:func:`trainer_transactional_id`), the scope of one ``seq`` numbering, and
nothing else (not the group id, not the host), so any two trainers of one lineage share it.
:meth:`UpdatePublisher.start` (``init_transactions``) bumps that id's producer epoch on the broker and aborts
any transaction an older trainer left open; from then on the older trainer's next transaction is refused
(``_FENCED``, fatal): nothing it produces becomes visible to ``read_committed`` readers (serving workers,
:func:`~liquidstream.pipeline.updates.topic.read_latest`), and it raises
:class:`~liquidstream.pipeline.errors.TrainerFenced` and
refuses every later publish.

Order at start-up: :meth:`~UpdatePublisher.start` *before* reading the topic for the highest ``seq``: an
older trainer's update committed before ``init_transactions`` returned is read then, and one not committed
by then is aborted, so the numbering continues from what serving workers can see.  Each
:meth:`~UpdatePublisher.publish` is one transaction (begin, produce, commit); the commit returns once the
broker acknowledged the record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from liquidstream.pipeline.errors import KafkaDeliveryError, PipelineError, TrainerFenced
from liquidstream.pipeline.kafka.transactions import (
    FENCED_CODES,
    TXN_RETRIES,
    TXN_TIMEOUT_S,
    Abortable,
    DeliveryTracker,
    call_transactional,
    producer_config,
)
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.record import MAX_RECORD_BYTES, UpdateRecord

__all__ = ["UpdatePublisher", "publisher_config", "trainer_transactional_id"]
log = logging.getLogger("liquidstream.model_updates")


def trainer_transactional_id(settings: Settings) -> str:
    """One id per (updates topic, lineage): the trainers that would compete for the same ``seq``."""
    return f"liquidstream-trainer-{settings.model_updates_topic}-{settings.model_lineage}"


def publisher_config(settings: Settings) -> dict[str, Any]:
    """The transactional producer's properties; librdkafka's own lines (its fencing error among them) go
    through the process's structured, redacting log handler."""
    return producer_config(settings, trainer_transactional_id(settings)) | {
        "message.max.bytes": MAX_RECORD_BYTES, "logger": logging.getLogger("liquidstream.kafka")}


class UpdatePublisher:
    """Transactional producer of signed updates: :meth:`start` once (fences older trainers of the lineage),
    then :meth:`publish` per update; ``producer`` replaces the one built from ``settings`` (tests)."""

    def __init__(self, settings: Settings, producer: Producer | None = None) -> None:
        self.topic, self.lineage = settings.model_updates_topic, settings.model_lineage
        self.txn_id = trainer_transactional_id(settings)
        self.producer = producer or Producer(publisher_config(settings))
        self.tracker = DeliveryTracker()
        self.started = False
        self._open = False  # a transaction begun and neither committed nor aborted
        self._dead: PipelineError | None = None  # fenced or fatally failed: raised again by every publish

    def start(self) -> None:
        """``init_transactions``: fence older trainers of the lineage, finish their open transaction.
        Idempotent; read the topic's highest seq only after this returned."""
        if self.started:
            return
        self._call(lambda: self.producer.init_transactions(TXN_TIMEOUT_S), "init_transactions", "start-up")
        self.started = True
        log.info("publishing updates of lineage %r to %s as transactional.id %s (older trainers fenced)",
                 self.lineage, self.topic, self.txn_id)

    def publish(self, record: UpdateRecord) -> None:
        """One transaction; returns once committed.  Raises :class:`TrainerFenced` when a newer trainer took
        over, :class:`KafkaDeliveryError` when the transaction aborted (nothing published)."""
        if self._dead is not None:
            raise self._dead
        if not self.started:
            msg = f"update publisher of lineage {self.lineage!r} used before start() (seq {record.seq})"
            raise PipelineError(msg)
        what = f"seq {record.seq}"
        try:
            self._call(self.producer.begin_transaction, "begin_transaction", what, tries=1)
            self._open = True
            self._call(lambda: self.producer.produce(self.topic, record.value, record.key,
                                                     headers=list(record.headers), on_delivery=self.tracker),
                       "produce", what, tries=1)
            self._call(lambda: self.producer.commit_transaction(TXN_TIMEOUT_S), "commit_transaction", what)
        except Abortable as ab:
            self.producer.poll(0)  # delivery reports: the first failure usually says why
            why = self.tracker.failures[0][2] if self.tracker.failures else str(ab)
            self._abort(what)
            msg = f"model update {what} not published (transaction aborted): {why}"
            raise KafkaDeliveryError(self.topic, msg) from ab
        self._open = False
        self.producer.poll(0)
        self.tracker.failures.clear()
        log.info("published model update seq %d version %s to %s", record.seq, record.version, self.topic)

    def close(self) -> None:
        """Abort a transaction an error left open (a fenced or failed producer has none to abort)."""
        if self._open and self._dead is None:
            try:
                self._abort("shutdown")
            except PipelineError as ex:
                log.error("abort at shutdown failed: %s", ex)

    def _abort(self, what: str) -> None:
        self._open = False
        self._call(lambda: self.producer.abort_transaction(TXN_TIMEOUT_S), "abort_transaction", what)
        self.producer.poll(0)
        self.tracker.failures.clear()

    def _death(self, err: KafkaError, what: str, where: str) -> PipelineError:
        """Fenced or fatally failed: remember it (every later publish raises it again) and drop queued records."""
        self._open = False
        if err.code() in FENCED_CODES:
            self._dead = TrainerFenced(self.lineage, self.topic, self.txn_id)
        else:
            msg = f"{what} for {where} failed: producer {self.txn_id} fatally failed: {err.str()}"
            self._dead = PipelineError(msg)
        with contextlib.suppress(KafkaException):  # records still queued never leave this process
            self.producer.purge()
            self.producer.poll(0)  # serve their delivery reports (purged)
        return self._dead

    def _call(self, call: Callable[[], None], what: str, where: str, tries: int = TXN_RETRIES) -> None:
        call_transactional(call, what, f"{where} on {self.topic}", self._death, tries)
