"""Model updates through Kafka: the compacted topic, the trainer's publisher, the serving worker's follower.

Record format and signature: :mod:`~liquidstream.pipeline.updates.record`.  The trainer's side, a
transactional publisher that fences a second trainer of the lineage: :mod:`~liquidstream.pipeline.updates.publisher`.
What a process may adopt: :class:`~liquidstream.pipeline.updates.gate.UpdateGate`.
:class:`ModelFollower` is the serving worker's side: a consumer outside any group (``read_committed``: an
update whose transaction aborted, e.g. a fenced trainer's, is never seen), assigned every partition of the
topic from the beginning (a restarted worker finds the latest compacted update), polled without blocking
*between* batches; per poll it screens the new records cheaply (signature, header, order) and fully decodes
at most one, the newest.  Every adoption and rejection is logged and counted
(``liquidstream_model_updates_total{result, reason}``).

"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient

from liquidstream.operators.forecaster import Forecaster
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.gate import UpdateGate
from liquidstream.pipeline.updates.record import (
    Envelope,
    ModelUpdate,
    UpdateRejected,
    signing_key,
)
from liquidstream.pipeline.updates.topic import (
    assign_from_start,
    ensure_updates_topic,
    record_headers,
    updates_consumer,
    where,
)

__all__ = ["ModelFollower"]
log = logging.getLogger("liquidstream.model_updates")
POLL_MESSAGES = 64  # records screened per follower poll (only the newest valid one is decoded)


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
        assign_from_start(self.consumer, self.topic)
        log.info("following model updates of lineage %r on %s", self.gate.lineage, self.topic)

    def poll(self, serving: Forecaster) -> ModelUpdate | None:
        """Screen what arrived since the last poll (no waiting); decode and return the newest valid update."""
        best: tuple[Envelope, Message] | None = None
        for m in self.consumer.consume(num_messages=POLL_MESSAGES, timeout=0):
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("model-updates consumer error on %s: %s", where(m), err.str())
                continue
            try:
                env = self.gate.screen(m.value(), record_headers(m), serving)
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
                 where(best[1]))
        return update

    def _reject(self, m: Message, ex: UpdateRejected) -> None:
        self.counts[f"rejected_{ex.reason.value}"] += 1
        self.metrics.model_update("rejected", ex.reason.value)
        log.warning("rejected model update at %s: %s", where(m), ex)

    def stats(self) -> dict[str, Any]:
        rejected = {k.removeprefix("rejected_"): v for k, v in sorted(self.counts.items()) if k.startswith("rej")}
        return {"adopted": self.counts["adopted"], "rejected": sum(rejected.values()),
                "rejected_by_reason": rejected, "superseded": self.counts["superseded"], "seq": self.gate.seq}

    def close(self) -> None:
        try:
            self.consumer.close()
        except KafkaException as ex:
            log.error("model-updates consumer close failed: %s", ex)
