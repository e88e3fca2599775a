"""The Kafka side of ``liquidstream run``: consume a batch, process it, make it durable, repeat.

Per batch: ``consume`` -> :func:`~liquidstream.pipeline.kafka.batch_step.handle_batch` -> changelog records of its
devices -> the committer (:mod:`~liquidstream.pipeline.kafka.transactions`;
:mod:`~liquidstream.pipeline.kafka.at_least_once` overlaps deliveries and offset commits with the next batches, settled
on an idle turn, a revocation, a stop).  An aborted transaction is rewound: the batch's devices get their pre-batch
state back and the consumer seeks to the batch's first offsets.

On assignment (in the rebalance callback: before any of the partitions' messages is fetched) the worker
fetches the group's committed offsets (stable: pending transactions resolved first) and restores the
partitions' devices from the changelog (:attr:`KafkaWorker.ready` False meanwhile); revoked partitions'
devices are dropped after their last commit (the revoke callback settles what is pending first): see
:mod:`liquidstream.pipeline.kafka.rebalance`.  Metrics, liveness and readiness go through
:class:`~liquidstream.pipeline.kafka.worker_ops.WorkerOps`,
served over HTTP on ``metrics_port`` when ``serve_ops`` (``liquidstream run``; not unit tests' fake clients).

Model updates (when ``settings.follows_model_updates``): a
:class:`~liquidstream.pipeline.updates.follower.ModelFollower` is
polled at the top of every loop turn, i.e. after the previous batch was handed to the committer (exactly-once:
committed, or aborted and rewound) and before the next ``consume``: a verified update swaps the operator's model
there, never inside a batch or an open transaction; every prediction records its version.  State is kept.
"""

from __future__ import annotations

import json
import logging
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from liquidstream.operators.operator import LiquidOperator
from liquidstream.pipeline.errors import PipelineError
from liquidstream.pipeline.kafka import batch_step as step
from liquidstream.pipeline.kafka import changelog as cl
from liquidstream.pipeline.kafka import transactions as tx
from liquidstream.pipeline.kafka.at_least_once import AtLeastOnce
from liquidstream.pipeline.kafka.bookkeeping import DeviceRegistry, StateUndo, Stats
from liquidstream.pipeline.kafka.device_query import DeviceQueries, Held
from liquidstream.pipeline.kafka.long_input import StreamAssembly
from liquidstream.pipeline.kafka.output import OutputTopics
from liquidstream.pipeline.kafka.rebalance import RESTORE_TIMEOUT_S, Rebalancing
from liquidstream.pipeline.kafka.worker_ops import WorkerOps
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.follower import ModelFollower
from liquidstream.pipeline.wire.codec import DecodeLimits
from liquidstream.pipeline.wire.types import TopicPart

log = logging.getLogger("liquidstream.worker")
STATS_EVERY_S = 10.0  # seconds between periodic stats lines (and idle-device eviction)
MAX_ABORTS_IN_ROW = 5  # a batch whose transaction keeps aborting (e.g. a record too large) stops the worker
RESTORE_TRIES = 5  # reads of the changelog on assignment while its partitions' leaders are moving
_MOVING = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                     KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION})


class KafkaWorker(Rebalancing):
    """One consumer-group member running the operator over its partitions until stopped or idle."""

    def __init__(self, settings: Settings, operator: LiquidOperator, *, worker_id: str,
                 consumer: Consumer | None = None, producer: Producer | None = None, serve_ops: bool = False,
                 ops: WorkerOps | None = None, updates: ModelFollower | None = None) -> None:
        """``consumer``/``producer``/``updates`` replace the clients built from ``settings`` (tests);
        ``serve_ops``: serve ``/metrics``, ``/healthz``, ``/readyz`` on ``settings.metrics_port`` in :meth:`run`."""
        self.settings, self.operator, self.worker_id = settings, operator, worker_id
        self.ops, self.serve_ops = ops or WorkerOps(settings), serve_ops
        self.eos = settings.guarantee == "exactly_once"
        self.topics = OutputTopics.from_settings(settings)
        self.limits = DecodeLimits.from_settings(settings, operator.n_channels)
        self.assembly = StreamAssembly(self.limits, round(settings.mapping.assembly_window_s * 1000)) \
            if settings.mapping.shape == "long" else None  # the long shape: channels waiting per partition
        self.stats, self.registry, self.layout = Stats(), DeviceRegistry(), cl.StateLayout(operator.store)
        self.consumer = consumer or Consumer(self.ops.client_config(tx.consumer_config(settings), stats=True))
        txn_id = tx.transactional_id(settings, worker_id)
        self.producer = producer or Producer(self.ops.client_config(
            tx.producer_config(settings, txn_id if self.eos else None), stats=False))
        self._assigned: set[TopicPart] = set()  # shared with the at-least-once committer: mutate in place
        self.committer: tx.Committer = tx.ExactlyOnce(self.producer, self.consumer, txn_id) if self.eos else \
            AtLeastOnce(self.producer, self.consumer, self._assigned, settings.group_id,
                        pipelined=settings.pipelined_commits)
        self._replayed: dict[TopicPart, int] = {}  # offsets below this are already in the restored state
        self._replay_done: dict[TopicPart, int] = {}  # next offset after replays skipped, to commit with the next
        self._restoring, self._warned = set[TopicPart](), dict[int, float]()
        self._restorer: Consumer | None = None
        self._stop_reason: str | None = None  # why run() stops (signal, idle); None while running
        self._last_activity = self._last_stats = time.monotonic()
        self._joined, self._aborts_in_row = False, 0
        self._positions: dict[TopicPart, int] = {}  # next input offset per partition after the last batch handed over
        self._seen: dict[TopicPart, float] = {}  # monotonic seconds of each partition's last batch (silence timer)
        self.updates = updates if updates is not None or not settings.follows_model_updates else \
            ModelFollower(settings, self.ops.metrics)
        self.queries = DeviceQueries(settings, worker_id) if settings.device_queries else None
        self._partitions = 0  # of the input topic, once known (ensure_changelog)

    def stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Signal handler: finish the current batch, commit it (and any still in flight), close, exit 0."""
        self._stop_reason = f"signal {signum}" if signum is not None else "stop requested"

    def run(self) -> int:
        s, code, batch = self.settings, 0, list[Message]()
        try:
            self.ops.set_model_version(self.operator.model_version)
            if self.serve_ops:
                self.ops.start(s.metrics_port, worker_ready=lambda: self.ready,
                               queries=None if self.queries is None else self.queries.ask)
            partitions = self._partitions = self.ensure_changelog()
            if self.updates is not None:
                self.updates.start()
            self.committer.start()
            self.consumer.subscribe([s.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
            step.tune_gc()  # start-up objects out of the collector's sight (issue #6)
            log.info("worker %s consuming %s (%d partitions) as group %s, %s, changelog %s, batches <= %d / %d ms",
                     self.worker_id, s.input_topic, partitions, s.group_id, s.guarantee, s.changelog,
                     s.batch_max_messages, s.batch_max_ms)
            while self._stop_reason is None:
                self.ops.beat()
                if self.queries is not None and self.queries.waiting():  # between batches, on this thread
                    self.queries.serve(self.operator, Held.of(s.input_topic, self._assigned, self._partitions,
                                                              self.registry))
                if self.updates is not None:
                    self._follow_updates(self.updates)  # between batches: the last one committed or rewound
                batch = []  # so that an error in consume() is not reported against the previous batch
                batch = self._data(self.consumer.consume(num_messages=s.batch_max_messages,
                                                         timeout=s.batch_max_ms / 1000.0))
                if batch:
                    self._handle(batch)
                else:
                    replays = self._take_replay_done()
                    if replays:
                        self.committer.commit([], [], replays)
                    self.committer.settle()  # no input now: what is in flight needs no next batch to commit
                    # idle counts from the group join (the assignment, restored): a slow join is not idleness
                    if s.exit_when_idle_s is not None and self._joined and \
                            time.monotonic() - self._last_activity >= s.exit_when_idle_s:
                        self._stop_reason = f"idle for {s.exit_when_idle_s} s"
                self._maybe_log_stats()
            batch = []
            self.committer.settle()  # stopping: the batches handed over become durable (errors exit 2)
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
        """The changelog partitions ``need``; a leader moving (or not settled yet: a changelog topic created a
        moment ago is in the metadata before its broker serves it) is retried, anything else raises."""
        self._restorer = self._restorer or cl.restore_consumer(self.settings)
        for attempt in range(1, RESTORE_TRIES + 1):
            try:
                return cl.read_changelog(self._restorer, self.settings.changelog, need, RESTORE_TIMEOUT_S)
            except PipelineError as ex:
                cause = ex.__cause__.args[0] if isinstance(ex.__cause__, KafkaException) else None
                if attempt == RESTORE_TRIES or not isinstance(cause, KafkaError) or cause.code() not in _MOVING:
                    raise
                log.warning("%s (attempt %d of %d, retrying)", ex, attempt, RESTORE_TRIES)
                time.sleep(0.5 * attempt)
        raise AssertionError  # unreachable: the last attempt returns or raises

    # ------------------------------------------------------------------ batches
    def _take_replay_done(self) -> dict[TopicPart, int]:
        """Offsets past the replays skipped since the last call, for partitions still assigned (the batch's own
        commits, later in each partition, take precedence when merged after these)."""
        done, self._replay_done = self._replay_done, {}
        return {tp: o for tp, o in done.items() if tp in self._assigned}

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
                    # ... and their offsets may be uncommitted (the predecessor died between its changelog and its
                    # offset commit): commit past them, or a partition with nothing newer would stay behind.
                    self._replay_done[where] = max(self._replay_done.get(where, 0), (m.offset() or 0) + 1)
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
        if self.assembly is not None and self.eos:  # an abort rewinds the channels waiting, too
            undo.also(self.assembly.load, self.assembly.save(step.offsets_to_commit(batch)))
        out = step.handle_batch(batch, self.operator, self.topics, self.limits, time.time_ns() // 1_000_000,
                                self.worker_id, before_process=undo.take if self.eos else None,
                                assembly=self.assembly)
        waiting = None if self.assembly is None else {tp: self.assembly.state(tp) for tp in out.commits}
        changelog = cl.changelog_records(self.layout, self.operator.store, out.device_partitions, out.commits,
                                         self.settings.changelog, self.operator.model_version, waiting)
        spent: list[float] = []  # seconds from decode to hand-over (at-least-once: durable a batch or two later)

        def done() -> None:  # the batch is durable; its busy time ends at its commit or at its hand-over
            seconds = spent[0] if spent else time.monotonic() - t0
            self.stats.add(out, seconds)
            self.ops.batch_done(out, seconds, len(self.operator.store))
            self._last_activity = time.monotonic()

        if not self.committer.commit(out.records, changelog, self._take_replay_done() | out.commits, done):
            self._rewind(batch, undo)
            return
        self._aborts_in_row = 0
        self._positions.update(out.commits)
        self._seen.update(dict.fromkeys(out.commits, time.monotonic()))
        self.registry.note(out.device_partitions)
        spent.append(time.monotonic() - t0)

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

    def _follow_updates(self, updates: ModelFollower) -> None:
        update = updates.poll(self.operator.model)
        if update is not None:
            self.operator.swap_model(update.model, update.version)
            self.ops.set_model_version(update.version)

    # ------------------------------------------------------------------ housekeeping
    def _close(self, code: int) -> None:
        log.info("shutting down (%s)", self._stop_reason or f"exit code {code}")
        self.committer.close()  # aborts a transaction left open by an error; at-least-once: settles
        try:
            self.consumer.close()  # leaves the group; the revoke callback commits anything deferred
        except KafkaException as ex:
            log.error("consumer close failed: %s", ex)
        if left := self.producer.flush(tx.FLUSH_TIMEOUT_S):
            log.error("%d output record(s) not delivered at shutdown", left)
        if self._restorer is not None:
            self._restorer.close()
        final = self.stats.as_dict() | {"final": True, "exit_code": code, "worker": self.worker_id, "guarantee":
                                        self.settings.guarantee, "model_version": self.operator.model_version}
        if self.updates is not None:
            self.updates.close()
            final["model_updates"] = self.updates.stats()
        log.info("final stats %s", json.dumps(final))
        print(json.dumps(final), flush=True)  # stdout: one JSON line, for scripts and tests
        self.ops.stop()  # after the last batch's metrics: scrapeable until the clients are closed

    def _maybe_log_stats(self) -> None:
        if time.monotonic() - self._last_stats >= STATS_EVERY_S:
            self._last_stats = time.monotonic()
            self._evict_idle()
            self._check_silence()
            log.info("stats %s", json.dumps(self.stats.as_dict() | {"devices": len(self.operator.store),
                                                                    "ready": self.ready}))

    def _check_silence(self) -> None:
        """Silences on partitions the stream left idle: each partition's stream time is its newest reading plus
        the wall time since its last batch (a busy partition's batches open them as its readings arrive)."""
        if self.operator.silence is None or not self._seen:
            return
        now = time.monotonic()
        by_tp = self.registry.by_partition()
        store, records, changed = self.operator.store, [], dict[str, TopicPart]()
        for tp, devices in by_tp.items():
            if tp not in self._assigned or tp not in self._seen:
                continue
            stream_ms = int(store.host["last_ts_ms"][store.lookup(devices)].max()) + \
                round((now - self._seen[tp]) * 1000)
            for alert in self.operator.check_silence(stream_ms, devices):
                changed[alert.device_id] = tp
                records.append(step.silence_record(alert, tp, self._positions, self.topics,
                                                   self.operator.model_version))
        if records:
            changelog = cl.changelog_records(self.layout, store, changed, {}, self.settings.changelog,
                                             self.operator.model_version)
            if self.committer.commit(records, changelog, {}):
                self.stats.alerts += len(records)
                log.info("%d device(s) silent: silence alerts opened", len(records))

    def _evict_idle(self) -> None:
        """Drop devices idle for ``state_ttl_s`` of event time (so replays do not evict all), tombstones first."""
        store, ttl_s = self.operator.store, self.settings.operator.state_ttl_s
        ids = store.device_ids()
        last: list[int] = store.host["last_ts_ms"][store.lookup(ids)].tolist()
        idle = [d for d, ts in zip(ids, last, strict=True) if ts < max(last, default=0) - int(ttl_s * 1000)]
        where = self.registry.partitions_of(idle)
        gone = cl.tombstones(where, self.settings.changelog)
        # an alert still open on an evicted device closes now ("evicted"), in the same commit as its tombstone
        closes = step.eviction_closes(self.operator.open_alerts(idle), where, self._positions, self.topics,
                                      self.operator.model_version)
        if idle and self.committer.commit(closes, gone, {}):
            self.registry.forget(store.drop(idle))
            self.ops.metrics.set_devices(len(store))
            log.info("evicted %d idle device(s) (state_ttl_s=%s)", len(idle), ttl_s)
