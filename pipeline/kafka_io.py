"""The Kafka side of ``liquidstream run``: consume a batch, process it, make it durable, repeat.

Per batch: ``consume`` -> :func:`~pipeline.worker.handle_batch` -> changelog records of its devices -> the
:mod:`~pipeline.transactions` committer.  An aborted transaction is rewound: the batch's devices get their
pre-batch state back and the consumer seeks to the batch's first offsets, so it runs again on that state.

On assignment (in the rebalance callback: before any of the partitions' messages is fetched) the worker
fetches the group's committed offsets (stable: pending transactions resolved first) and restores the
partitions' devices from the changelog (:attr:`KafkaWorker.ready` False meanwhile).  Revoked partitions'
devices are dropped after their last commit (each batch commits before the next ``consume``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from operators.errors import StateFormatError
from operators.operator import LiquidOperator
from pipeline import changelog as cl
from pipeline import transactions as tx
from pipeline import worker as step
from pipeline.codec import DecodeLimits
from pipeline.errors import PipelineError
from pipeline.settings import Settings
from pipeline.worker import StateUndo, TopicPart

log = logging.getLogger("liquidstream.worker")
STATS_EVERY_S = 10.0  # seconds between periodic stats lines (and idle-device eviction)
RESTORE_TIMEOUT_S = 120.0  # seconds for the committed-offset fetch and the changelog read on assignment
MAX_ABORTS_IN_ROW = 5  # a batch whose transaction keeps aborting (e.g. a record too large) stops the worker


class KafkaWorker:
    """One consumer-group member running the operator over its partitions until stopped or idle."""

    def __init__(self, settings: Settings, operator: LiquidOperator, *, worker_id: str,
                 consumer: Consumer | None = None, producer: Producer | None = None) -> None:
        """``consumer``/``producer`` replace the clients built from ``settings`` (tests)."""
        self.settings, self.operator, self.worker_id = settings, operator, worker_id
        self.eos = settings.guarantee == "exactly_once"
        self.topics = step.OutputTopics(settings.predictions_topic, settings.alerts_topic, settings.dlq_topic)
        self.limits = DecodeLimits.from_settings(settings, operator.n_channels)
        self.stats, self.registry, self.layout = step.Stats(), step.DeviceRegistry(), cl.StateLayout(operator.store)
        self.consumer = consumer or Consumer(tx.consumer_config(settings))
        txn_id = tx.transactional_id(settings, worker_id)
        self.producer = producer or Producer(tx.producer_config(settings, txn_id if self.eos else None))
        self._assigned: set[TopicPart] = set()  # shared with the at-least-once committer: mutate in place
        self.committer: tx.Committer = tx.ExactlyOnce(self.producer, self.consumer, txn_id) if self.eos else \
            tx.AtLeastOnce(self.producer, self.consumer, self._assigned, settings.group_id)
        self._replayed: dict[TopicPart, int] = {}  # offsets below this are already in the restored state
        self._restoring: set[TopicPart] = set()
        self._restorer: Consumer | None = None
        self._stop_reason: str | None = None
        self._last_activity = self._last_stats = time.monotonic()
        self._warned: dict[int, float] = {}
        self._joined, self._aborts_in_row = False, 0

    @property
    def ready(self) -> bool:
        """True once the worker joined its group and every assigned partition's state is restored."""
        return self._joined and not self._restoring

    def stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Signal handler: finish the current batch, commit it, close, exit 0."""
        self._stop_reason = f"signal {signum}" if signum is not None else "stop requested"

    def run(self) -> int:
        s = self.settings
        code, batch = 0, list[Message]()
        try:
            partitions = self.ensure_changelog()
            self.committer.start()
            self.consumer.subscribe([s.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
            log.info("worker %s consuming %s (%d partitions) as group %s, %s, changelog %s, batches <= %d / %d ms",
                     self.worker_id, s.input_topic, partitions, s.group_id, s.guarantee, s.changelog,
                     s.batch_max_messages, s.batch_max_ms)
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

    # ------------------------------------------------------------------ changelog I/O (overridden in tests)
    def ensure_changelog(self) -> int:
        return cl.ensure_topic(AdminClient(self.settings.kafka_client_config()), self.settings)

    def read_changelog(self, need: dict[int, int]) -> cl.Restored:
        self._restorer = self._restorer or cl.restore_consumer(self.settings)
        return cl.read_changelog(self._restorer, self.settings.changelog, need, RESTORE_TIMEOUT_S)

    # ------------------------------------------------------------------ batches
    def _data(self, messages: list[Message]) -> list[Message]:
        """The data messages of partitions still assigned, minus replays; consumer errors handled here."""
        data: list[Message] = []
        for m in messages:
            err = m.error()
            if err is None:
                where = (m.topic() or "", m.partition() or 0)
                if where not in self._assigned:
                    self.stats.skipped_revoked += 1
                elif (m.offset() or 0) < self._replayed.get(where, -1):
                    self.stats.skipped_replayed += 1  # at-least-once after a crash: outputs delivered already
                else:
                    data.append(m)
            elif err.fatal():
                msg = f"fatal consumer error on {m.topic()}[{m.partition()}]: {err.str()}"
                raise PipelineError(msg)
            elif err.code() != KafkaError._PARTITION_EOF and \
                    time.monotonic() - self._warned.get(err.code(), -STATS_EVERY_S) >= STATS_EVERY_S:
                self._warned[err.code()] = time.monotonic()  # a recurring client error: once per interval
                log.warning("consumer error on %s[%s]: %s", m.topic(), m.partition(), err.str())
        return data

    def _handle(self, batch: list[Message]) -> None:
        t0 = time.monotonic()
        self.stats.first_message = self.stats.first_message or t0
        undo = StateUndo(self.operator.store)
        out = step.handle_batch(batch, self.operator, self.topics, self.limits, time.time_ns() // 1_000_000,
                                self.worker_id, before_process=undo.take if self.eos else None)
        changelog = cl.changelog_records(self.layout, self.operator.store, out.device_partitions, out.commits,
                                         self.settings.changelog, self.operator.model_version)
        if not self.committer.commit(out.records, changelog, out.commits):
            self._rewind(batch, undo)
            return
        self._aborts_in_row = 0
        self.registry.note(out.device_partitions)
        self.stats.add(out, time.monotonic() - t0)
        self._last_activity = time.monotonic()

    def _rewind(self, batch: list[Message], undo: StateUndo) -> None:
        """After an abort: the batch's devices as before it, the consumer back at its first offsets."""
        self.stats.aborted += 1
        self._aborts_in_row += 1
        undo.apply()
        if self._aborts_in_row >= MAX_ABORTS_IN_ROW:
            msg = f"transaction for {step.describe_range(batch)} aborted {self._aborts_in_row} times in a row"
            raise PipelineError(msg)
        first = {(t, p): o for t, p, o in map(step.coords, reversed(batch))}  # offsets rise per partition
        for (t, p), o in sorted(first.items()):
            if (t, p) in self._assigned:
                self.consumer.seek(TopicPartition(t, p, o))

    # ------------------------------------------------------------------ rebalances
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = {(tp.topic, tp.partition) for tp in partitions}
        self._restoring.update(tps)
        if tps:
            self._restore(consumer, partitions)
        self._assigned.update(tps)
        self._restoring.difference_update(tps)
        self._joined, self._last_activity = True, time.monotonic()
        log.info("assigned %s", sorted(f"{t}[{p}]" for t, p in tps))

    def _restore(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """The partitions' devices, as of the offsets the group committed, back into the operator's store."""
        t0, store, topic = time.monotonic(), self.operator.store, self.settings.changelog
        # read_committed: waits until a pending transaction's offsets are resolved (KafkaException -> exit 2)
        need = {tp.partition: max(tp.offset, -1) for tp in consumer.committed(partitions, RESTORE_TIMEOUT_S)}
        got = self.read_changelog(need)
        store.drop(self.registry.release((tp.topic, tp.partition) for tp in partitions))  # stale, if any
        try:
            if got.blobs:
                store.restore(self.layout.merge(got.blobs))
        except StateFormatError as ex:
            msg = f"changelog {topic} partitions {sorted(need)}: state does not fit this model: {ex}"
            raise PipelineError(msg) from ex
        topic_of = {tp.partition: tp.topic for tp in partitions}
        self.registry.note({d: (topic_of[p], p) for d, p in got.partition_of.items()})
        for p, ahead in got.progress.items():  # at-least-once crash after the changelog, before the offsets
            if ahead > need[p]:
                self._replayed[(topic_of[p], p)] = ahead
                log.warning("%s[%d]@%d..%d: already in the restored state, skipped", topic_of[p], p, need[p], ahead - 1)
        seconds, versions = time.monotonic() - t0, dict(Counter(got.model_version.values()))
        self.stats.restored_devices += len(got.blobs)
        self.stats.restore_s += seconds
        log.info("restored %d device(s) of partitions %s from %s in %.3f s (%d records; written by model versions "
                 "%s, serving %s)", len(got.blobs), sorted(need), topic, seconds, got.records, versions,
                 self.operator.model_version)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.committer.before_revoke()
        self._release(partitions, "revoked")

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "lost")  # no commit: another member may own them already

    def _release(self, partitions: list[TopicPartition], how: str) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned.difference_update(gone)
        self.committer.forget(gone)
        self._replayed = {tp: o for tp, o in self._replayed.items() if tp not in gone}
        dropped = self.operator.store.drop(self.registry.release(gone))
        log.info("%s %s; dropped the state of %d device(s)", how, sorted(f"{t}[{p}]" for t, p in gone),
                 len(dropped))

    # ------------------------------------------------------------------ housekeeping
    def _close(self, code: int) -> None:
        log.info("shutting down (%s)", self._stop_reason or f"exit code {code}")
        self.committer.close()  # aborts a transaction left open by an error
        try:
            self.consumer.close()  # leaves the group; the revoke callback commits anything deferred
        except KafkaException as ex:
            log.error("consumer close failed: %s", ex)
        if left := self.producer.flush(tx.FLUSH_TIMEOUT_S):
            log.error("%d output record(s) not delivered at shutdown", left)
        if self._restorer is not None:
            self._restorer.close()
        final = self.stats.as_dict() | {"final": True, "exit_code": code, "worker": self.worker_id,
                                        "guarantee": self.settings.guarantee}
        log.info("final stats %s", json.dumps(final))
        print(json.dumps(final), flush=True)  # stdout: one JSON line, for scripts and tests

    def _maybe_log_stats(self) -> None:
        if time.monotonic() - self._last_stats >= STATS_EVERY_S:
            self._last_stats = time.monotonic()
            self._evict_idle()
            log.info("stats %s", json.dumps(self.stats.as_dict() | {"devices": len(self.operator.store),
                                                                    "ready": self.ready}))

    def _evict_idle(self) -> None:
        """Drop devices idle for ``state_ttl_s`` of event time (so replays do not evict all), tombstones first."""
        store, ttl_s = self.operator.store, self.settings.operator.state_ttl_s
        ids = store.device_ids()
        last: list[int] = store.host["last_ts_ms"][store.lookup(ids)].tolist()
        idle = [d for d, ts in zip(ids, last, strict=True) if ts < max(last, default=0) - int(ttl_s * 1000)]
        gone = cl.tombstones(self.registry.partitions_of(idle), self.settings.changelog)
        if idle and self.committer.commit([], gone, {}):
            self.registry.forget(store.drop(idle))
            log.info("evicted %d idle device(s) (state_ttl_s=%s)", len(idle), ttl_s)
