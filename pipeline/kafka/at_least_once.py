"""At-least-once commits, pipelined: outputs acknowledged, then changelog acknowledged, then offsets committed.

The guarantee, per batch *K*: its outputs (predictions, alerts, dead letters) are acknowledged before its
changelog records are produced, and its changelog (state and progress records) is acknowledged before its
input offsets commit.  So no offset commits before every output of the readings below it is delivered, and
no progress record (a restore skips readings below it as already published:
:mod:`liquidstream.pipeline.kafka.rebalance`)
exists before those outputs are delivered.

Pipelined (``settings.pipelined_commits``, the default), nothing waits for the *next* batch's work:
``commit(K)`` waits (one flush) for what ``commit(K-1)`` produced -- outputs(K-1) and changelog(K-2), in
flight while batch *K* was consumed and computed -- then produces changelog(K-1) and outputs(K); the offsets of
K-2 and earlier commit (one synchronous commit) once :data:`COMMIT_EVERY_S` passed since the last one.  One
flush per batch instead of two, and it rarely waits.  :meth:`AtLeastOnce.settle` runs the pipeline dry and
commits: on an idle loop turn, at shutdown, before a revocation.  A lost partition's pending changelog records
and offsets are dropped (its new owner may have written newer state already).  Not pipelined, each ``commit``
settles its batch before returning (produce, flush, changelog, flush, commit).

A delivery failure is sticky: after it nothing is produced or committed again (the worker exits; the
batches not committed are consumed again by the partitions' next owner).

>>> from collections import Counter
>>> calls = Counter()
>>> class P:
...     def produce(self, *args, **kw): calls["produce"] += 1
...     def poll(self, timeout=0): return 0
...     def flush(self, timeout=-1): calls["flush"] += 1; return 0
>>> class C:
...     def commit(self, offsets, asynchronous=True): calls["commit"] += 1; return offsets
>>> alo, done = AtLeastOnce(P(), C(), {("in", 0)}, "group"), []
>>> alo.commit([OutRecord("out", b"k", b"v")], [OutRecord("cl", b"k", b"s", None, 0)], {("in", 0): 5},
...            done=lambda: done.append(1))
True
>>> calls, done  # outputs produced, nothing waited for
(Counter({'produce': 1}), [])
>>> alo.settle(); calls, done
(Counter({'produce': 2, 'flush': 2, 'commit': 1}), [1])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from liquidstream.pipeline.errors import KafkaDeliveryError, PipelineError
from liquidstream.pipeline.kafka.output import OutRecord
from liquidstream.pipeline.kafka.transactions import (
    RETRY_COMMIT,
    Committer,
    DeliveryTracker,
    describe_offsets,
    flush_checked,
    produce_all,
)
from liquidstream.pipeline.wire.types import TopicPart

__all__ = ["AtLeastOnce"]
log = logging.getLogger("liquidstream.worker")
#: Seconds between two offset commits while batches keep coming (each is a blocking broker round trip, about
#: 6 ms a batch measured).  A later commit loses nothing: a restart skips what the changelog progress records
#: already hold (liquidstream.pipeline.kafka.rebalance), so only this much more input is fetched and skipped again.
COMMIT_EVERY_S = 1.0


@dataclass
class _Pending:
    """A batch whose outputs (or changelog) are produced but not yet acknowledged."""

    changelog: list[OutRecord]
    offsets: dict[TopicPart, int]
    done: Callable[[], None] | None


class AtLeastOnce(Committer):
    """Outputs, then changelog, then offsets, each after the one before is acknowledged (see the module)."""

    def __init__(self, producer: Producer, consumer: Consumer, assigned: set[TopicPart], group: str, *,
                 pipelined: bool = True) -> None:
        self.producer, self.consumer, self.assigned, self.group = producer, consumer, assigned, group
        self.pipelined = pipelined
        self.tracker = DeliveryTracker()
        self._outputs_sent: list[_Pending] = []  # outputs produced, not yet acknowledged
        self._changelog_sent: list[_Pending] = []  # outputs acknowledged, changelog produced, not acknowledged
        self._durable: list[_Pending] = []  # changelog acknowledged, offsets not committed yet
        self._committed_at = time.monotonic()
        self._uncommitted: dict[TopicPart, int] = {}  # durable but not yet committed (retriable failure)
        self._failed: str | None = None  # the delivery failure that stopped this committer

    def commit(self, outputs: Sequence[OutRecord], changelog: Sequence[OutRecord],
               offsets: dict[TopicPart, int], done: Callable[[], None] | None = None) -> bool:
        self._advance()
        produce_all(self.producer, outputs, self.tracker)
        self._outputs_sent.append(_Pending(list(changelog), dict(offsets), done))
        if not self.pipelined:
            self.settle()
        elif time.monotonic() - self._committed_at >= COMMIT_EVERY_S:
            self._commit_durable()  # its round trip overlaps the deliveries just queued
        return True

    def settle(self) -> None:
        """Every batch handed over so far: delivered, its changelog delivered, its offsets committed."""
        while self._outputs_sent or self._changelog_sent:
            self._advance()
        self._commit_durable()
        self._commit({})  # a deferred commit, if any

    def _advance(self) -> None:
        """Wait for every record produced so far, then move each pending batch one stage on: those whose
        outputs are acknowledged produce their changelog, those whose changelog is acknowledged are durable."""
        if self._failed is not None:
            msg = f"an earlier delivery failed ({self._failed}): nothing more is committed"
            raise PipelineError(msg)
        if not self._outputs_sent and not self._changelog_sent:
            return
        try:
            flush_checked(self.producer, self.tracker)
        except KafkaDeliveryError as ex:
            self._failed = str(ex)
            raise
        self._durable += self._changelog_sent
        self._changelog_sent, self._outputs_sent = self._outputs_sent, []
        for batch in self._changelog_sent:
            produce_all(self.producer, batch.changelog, self.tracker)

    def _commit_durable(self) -> None:
        durable, self._durable, self._committed_at = self._durable, [], time.monotonic()
        if not durable:
            return
        offsets: dict[TopicPart, int] = {}
        for batch in durable:  # offsets rise batch after batch: the last one per partition wins
            offsets.update(batch.offsets)
        self._commit(offsets)
        for batch in durable:
            if batch.done is not None:
                batch.done()

    def _commit(self, offsets: dict[TopicPart, int]) -> None:
        pending = self._uncommitted | offsets
        pending = {tp: o for tp, o in pending.items() if tp in self.assigned}  # a revoked one is not ours
        self._uncommitted = {}
        if not pending:
            return
        where = describe_offsets(pending)
        try:
            result = self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in pending.items()],
                                          asynchronous=False)
            errors = [(tp.topic, tp.partition, tp.error) for tp in result if tp.error is not None]
        except KafkaException as ex:
            errors = [(t, p, ex.args[0]) for t, p in pending]
        for topic, partition, err in errors:
            if not isinstance(err, KafkaError) or not (err.code() in RETRY_COMMIT or err.retriable()):
                msg = f"commit of {where} (group {self.group}) failed on {topic}[{partition}]: {err}"
                raise PipelineError(msg)
            log.warning("commit of %s[%s] deferred: %s", topic, partition, err.str())
            self._uncommitted[(topic, partition)] = pending[(topic, partition)]

    def before_revoke(self) -> None:
        try:
            self.settle()  # everything pending, while the partitions are still ours
        except PipelineError as ex:
            log.error("commit before revocation failed: %s", ex)
            if self._failed is not None:
                self._commit_durable()  # offsets made durable before the failure are still safe to commit
                self._commit({})

    def forget(self, partitions: set[TopicPart]) -> None:
        """Lost partitions: their pending changelog records and offsets go (their new owner's state wins)."""
        numbers = {p for _, p in partitions}
        for batch in (*self._outputs_sent, *self._changelog_sent, *self._durable):
            batch.changelog = [r for r in batch.changelog if r.partition not in numbers]
            batch.offsets = {tp: o for tp, o in batch.offsets.items() if tp not in partitions}
        for tp in partitions:
            self._uncommitted.pop(tp, None)

    def close(self) -> None:
        """At shutdown: settle what was handed over (an error exit included: those batches were complete)."""
        if self._failed is None and (self._outputs_sent or self._changelog_sent or self._durable):
            try:
                self.settle()
            except PipelineError as ex:
                log.error("settling at shutdown failed: %s", ex)
