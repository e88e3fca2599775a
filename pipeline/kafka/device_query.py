"""``GET /devices/{id}[?at=EPOCH_MS]``: a device's forecast at an instant, answered from this worker's own state.

State is partitioned by key, as in Kafka Streams' interactive queries: a worker answers for the devices of the
input partitions it holds, and for any other device says which partition it is on
(:mod:`~liquidstream.pipeline.kafka.ownership`) and that another worker owns it.

**The handoff.**  The operator belongs to the worker thread: ``process``, the restores and drops of a rebalance,
the undo of an aborted transaction and a model swap all run there, from many places.  Rather than a lock around
every one of them (one forgotten place is a torn read, and a query would hold up a batch), the HTTP thread puts its
request on a queue (:meth:`DeviceQueries.ask`) and waits; the worker loop answers every waiting request at the top
of each turn (:meth:`DeviceQueries.serve`), between two batches.  The answer therefore sees committed state under
exactly-once (the previous batch committed, or aborted and rewound) and never a half-applied batch.  One answer is a
single small forward pass (0.8 ms median, 4 channels x 32 hidden units, busy 2-core box); the loop turns at least
every ``batch_max_ms`` (10 ms) when idle, so a query waits for at most one batch.  A loop busy for longer than
:data:`ANSWER_TIMEOUT_S` (a restore of many devices) gets the caller a 503, and at most :data:`MAX_WAITING` requests
queue up (503 beyond).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from liquidstream.operators.errors import DeviceQueryError
from liquidstream.operators.operator import LiquidOperator
from liquidstream.pipeline.kafka.bookkeeping import DeviceRegistry
from liquidstream.pipeline.kafka.ownership import partition_for
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.types import TopicPart

__all__ = ["ANSWER_TIMEOUT_S", "MAX_WAITING", "STATUS_OF", "DeviceQueries", "Held"]
log = logging.getLogger("liquidstream.worker")

#: Seconds the HTTP thread waits for the worker loop to answer (503 after).
ANSWER_TIMEOUT_S = 5.0
#: Requests waiting for the loop at most; more get 503 at once (each waiting one holds an HTTP thread).
MAX_WAITING = 64
#: HTTP status per :class:`~liquidstream.operators.errors.DeviceQueryError` reason.
STATUS_OF = {"unknown": 404, "no_reading": 404, "before_last_reading": 400, "invalid": 400}
Answer = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class Held:
    """What this worker holds: the input topic, its partitions assigned here, the topic's partition count (0:
    not known yet) and, per device it has state for, the partition its readings came from."""

    topic: str
    partitions: frozenset[int]
    count: int
    home: Callable[[str], int | None]

    @classmethod
    def of(cls, topic: str, assigned: Iterable[TopicPart], count: int, registry: DeviceRegistry) -> Held:
        """What a worker with these ``assigned`` partitions and device ``registry`` holds of ``topic``."""
        def home(device_id: str) -> int | None:
            tp = registry.partitions_of([device_id]).get(device_id)
            return None if tp is None else tp[1]

        return cls(topic, frozenset(p for t, p in assigned if t == topic), count, home)


def _floats(a: np.ndarray) -> list[float]:
    return [float(f"{v:.7g}") for v in a.tolist()]  # float32: 7 significant digits say all it holds


class _Request:
    def __init__(self, device_id: str, at_ms: int | None) -> None:
        self.device_id, self.at_ms = device_id, at_ms
        self.done = threading.Event()
        self.answer: Answer = (500, {"status": "error", "reason": "not answered"})


class DeviceQueries:
    """The queue between the HTTP thread (:meth:`ask`) and the worker loop (:meth:`serve`)."""

    def __init__(self, settings: Settings, worker_id: str, *, timeout_s: float = ANSWER_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.partitioner, self.worker_id = settings.input_partitioner, worker_id
        self.timeout_s, self._clock = timeout_s, clock  # clock: wall time, seconds
        self._waiting: queue.SimpleQueue[_Request] = queue.SimpleQueue()

    def ask(self, device_id: str, at_ms: int | None) -> Answer:
        """Called from the HTTP thread: the answer to one query, once the loop gave it (or 503)."""
        if self._waiting.qsize() >= MAX_WAITING:
            return 503, {"status": "busy", "reason": f"{MAX_WAITING} device queries are already waiting"}
        req = _Request(device_id, at_ms)
        self._waiting.put(req)
        if not req.done.wait(self.timeout_s):
            return 503, {"status": "busy", "reason": f"the worker loop did not answer within {self.timeout_s:g} s "
                                                     "(a long batch or a restore); try again"}
        return req.answer

    def waiting(self) -> bool:
        """Whether a query waits for :meth:`serve` (a cheap check for every loop turn)."""
        return not self._waiting.empty()

    def serve(self, operator: LiquidOperator, held: Held) -> int:
        """Called from the worker loop between batches: answer every waiting query; returns how many."""
        served = 0
        while True:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                return served
            try:
                req.answer = self.answer(operator, held, req.device_id, req.at_ms)
            except Exception:  # a bug in answering one query must not stop the stream
                log.exception("device query for %r failed", req.device_id)
                req.answer = (500, {"status": "error", "reason": "internal error answering the query (logged)"})
            finally:
                req.done.set()
            served += 1

    def answer(self, operator: LiquidOperator, held: Held, device_id: str, at_ms: int | None) -> Answer:
        """One query on the worker thread: the forecast at ``at_ms`` (None: now, or the last reading's time if
        that is later, e.g. a device whose clock runs ahead)."""
        store = operator.store
        row = int(store.lookup([device_id])[0])
        if at_ms is None:
            now_ms = int(self._clock() * 1000)  # s -> ms
            at_ms = max(now_ms, int(store.host["last_ts_ms"][row])) if row >= 0 else now_ms
        try:
            got = operator.forecast_at([device_id], [at_ms])
        except DeviceQueryError as ex:
            reason = self._not_held(device_id, held) if ex.reason == "unknown" else str(ex)
            return STATUS_OF[ex.reason], {"status": "not found" if STATUS_OF[ex.reason] == 404 else "bad request",
                                          "reason": reason}
        opened = int(got.alert_opened_ms[0])
        alert: dict[str, Any] = {"open": bool(got.alert_open[0])}
        if alert["open"]:
            alert |= {"alert_id": f"{device_id}@{opened}", "opened_ts": opened}
        gap_s = round(float(got.dt_s[0]), 3)  # a gap of whole ms, seconds
        return 200, {"device_id": device_id, "at": int(got.ts_ms[0]), "last_reading_ts": int(got.last_ts_ms[0]),
                     "gap_s": gap_s, "long_gap": bool(got.long_gap[0]), "readings": int(got.readings[0]),
                     "forecast": _floats(got.forecast[0]), "forecast_std": _floats(got.forecast_std[0]),
                     "normal_level": _floats(got.normal_level[0]), "normal_spread": _floats(got.normal_spread[0]),
                     "alert": alert, "model_version": got.model_version, "topic": held.topic,
                     "partition": held.home(device_id), "worker": self.worker_id}

    def _not_held(self, device_id: str, held: Held) -> str:
        """Why this worker has no state for ``device_id``: its partition is another worker's, or no reading."""
        if held.count <= 0:
            return f"device {device_id!r} is not held by this worker"
        p = partition_for(device_id.encode(), held.count, self.partitioner)
        where = f"partition {held.topic}[{p}] ({self.partitioner} partitioner)"
        if p in held.partitions:
            return f"device {device_id!r} has no reading on this worker, which holds its {where}"
        return f"device {device_id!r} belongs to {where}, owned by another worker"
