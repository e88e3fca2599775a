"""What a :class:`~liquidstream.pipeline.kafka.worker.KafkaWorker` does when the group moves partitions (the rebalance
callbacks).

On assignment (before any of the partitions' messages is fetched): fetch the group's committed offsets (stable: pending
transactions resolved first), restore the partitions' devices from the changelog, report progress to
:class:`~liquidstream.pipeline.kafka.worker_ops.WorkerOps` (``/readyz`` 503 and restore progress < 1 meanwhile). On
revocation: commit what is pending (at-least-once), drop the partitions' devices and lag series; a lost partition is
dropped without a commit (another member may own it already).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from confluent_kafka import Consumer, TopicPartition

from liquidstream.operators.errors import StateFormatError
from liquidstream.operators.operator import LiquidOperator
from liquidstream.pipeline.errors import PipelineError
from liquidstream.pipeline.kafka import changelog as cl
from liquidstream.pipeline.kafka import transactions as tx
from liquidstream.pipeline.kafka.bookkeeping import DeviceRegistry, Stats
from liquidstream.pipeline.kafka.long_input import StreamAssembly
from liquidstream.pipeline.kafka.worker_ops import WorkerOps
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.types import TopicPart

__all__ = ["RESTORE_TIMEOUT_S", "Rebalancing"]
log = logging.getLogger("liquidstream.worker")
RESTORE_TIMEOUT_S = 120.0  # seconds for the committed-offset fetch and the changelog read on assignment


class Rebalancing:
    """The rebalance callbacks of :class:`~liquidstream.pipeline.kafka.worker.KafkaWorker` (a mixin: the worker owns
    the state)."""

    settings: Settings
    operator: LiquidOperator
    ops: WorkerOps
    stats: Stats
    registry: DeviceRegistry
    layout: cl.StateLayout
    committer: tx.Committer
    _assigned: set[TopicPart]
    _restoring: set[TopicPart]
    _replayed: dict[TopicPart, int]
    assembly: StreamAssembly | None
    _seen: dict[TopicPart, float]  # the silence timer's clock per partition: set by batches only
    _joined: bool
    _last_activity: float

    @property
    def ready(self) -> bool:
        """True once the worker joined its group and every assigned partition's state is restored."""
        return self._joined and not self._restoring

    def read_changelog(self, need: dict[int, int]) -> cl.Restored:
        raise NotImplementedError

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = {(tp.topic, tp.partition) for tp in partitions}
        for tp in tps:  # the silence timer waits for a batch of the new assignment: no wall time before it counts
            self._seen.pop(tp, None)
        self._restoring.update(tps)
        self.ops.assigning(tps)
        if tps:
            self._restore(consumer, partitions)
        self._assigned.update(tps)
        self._restoring.difference_update(tps)
        self.ops.restored(tps, len(self.operator.store))
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
        if self.assembly is not None:  # the long shape's channels waiting, as of the same progress
            for p in need:
                self.assembly.restore((topic_of[p], p), got.waiting.get(p))
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
        self._seen = {tp: t for tp, t in self._seen.items() if tp not in gone}
        dropped = self.operator.store.drop(self.registry.release(gone))
        if self.assembly is not None:
            self.assembly.drop(gone)
        self.ops.released(gone, len(self.operator.store))
        log.info("%s %s; dropped the state of %d device(s)", how, sorted(f"{t}[{p}]" for t, p in gone),
                 len(dropped))
