"""Signed model updates for the faust app: the Kafka worker's
:class:`~liquidstream.pipeline.updates.follower.ModelFollower`,
swapped into the agent's operator only between two batches.

Same gate, metrics and log lines as ``liquidstream run`` (:mod:`liquidstream.pipeline.kafka.worker`): the follower
screens every record (signature, lineage, ``seq`` order, architecture), logs ``adopting model update ...`` or ``rejected
model update ...``, counts ``liquidstream_model_updates_total{result, reason}``, and the served version is the
``liquidstream_model_version`` gauge (kept in a :class:`~liquidstream.pipeline.ops.metrics.Metrics` of its own: the
faust app serves no ``/metrics``; its stats lines carry :meth:`ModelUpdates.stats` instead).  Switched by the worker's
setting, ``settings.follows_model_updates`` (on when ``LIQUIDSTREAM_MODEL_SIGNING_KEY`` is set, unless
``LIQUIDSTREAM_FOLLOW_MODEL_UPDATES=false``).

Where the swap happens, and why there: the agent polls at the start of each batch's compute (in the worker thread,
holding the step lock, before the batch is decoded), like the worker's poll at the top of each loop turn; an idle
app has no batches, so a faust timer polls too, but only while no batch holds the lock (it takes the lock for the
poll).  Both places are between batches by construction: the previous batch's outputs and state are delivered and
the next one has not started, so a batch is never served by two models.  The follower's consumer is a
confluent-kafka one (librdkafka fetches in its own thread); a poll never waits for the broker.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from liquidstream.operators.operator import LiquidOperator
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.follower import ModelFollower

__all__ = ["UPDATES_EVERY_S", "ModelUpdates"]
log = logging.getLogger("liquidstream.faust")
#: Seconds between the timer's polls while the agent is idle (a poll costs one non-blocking ``consume``).
UPDATES_EVERY_S = 1.0


class ModelUpdates:
    """A :class:`ModelFollower` bound to one operator.  :meth:`adopt` is called only between batches (by the
    agent's compute and the idle timer, both holding the step lock); a mutex of its own also keeps a poll and
    :meth:`close` apart, since the poll runs in a worker thread that outlives a cancelled agent."""

    def __init__(self, settings: Settings, operator: LiquidOperator, *, follower: ModelFollower | None = None,
                 metrics: Metrics | None = None) -> None:
        self.operator, self.metrics = operator, metrics or Metrics()
        self.follower = follower or ModelFollower(settings, self.metrics)
        self.metrics.set_model_version(operator.model_version)
        self._mutex, self._closed = threading.Lock(), False

    @classmethod
    def from_settings(cls, settings: Settings, operator: LiquidOperator) -> ModelUpdates | None:
        """The follower the worker would run (``settings.follows_model_updates``), or None."""
        return cls(settings, operator) if settings.follows_model_updates else None

    def start(self) -> None:
        """Create the updates topic if missing and read it from its beginning (blocking: broker round trips)."""
        self.follower.start()

    def adopt(self) -> str | None:
        """Screen what arrived since the last call (no waiting) and swap the newest verified update into the
        operator; returns its version, or None (nothing new, everything rejected, or closed)."""
        with self._mutex:
            if self._closed:
                return None
            update = self.follower.poll(self.operator.model)
            if update is None:
                return None
            self.operator.swap_model(update.model, update.version)  # device state is kept, as in the worker
            self.metrics.set_model_version(update.version)
            return update.version

    def stats(self) -> dict[str, Any]:
        """The worker's ``model_updates`` figures (adopted, rejected by reason, superseded, served seq)."""
        return self.follower.stats()

    def close(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                self.follower.close()
