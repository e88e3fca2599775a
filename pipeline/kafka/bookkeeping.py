"""A worker's bookkeeping across batches: running counters, where each device is read from, and a batch's undo.

Split from :mod:`~liquidstream.pipeline.kafka.batch_step`: the batch step itself stays one concept.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from liquidstream.operators.state.store import DeviceStateStore
from liquidstream.pipeline.kafka.output import BatchOutput
from liquidstream.pipeline.wire.schemas import DeadLetterReason
from liquidstream.pipeline.wire.types import TopicPart

T = TypeVar("T")

__all__ = ["DeviceRegistry", "StateUndo", "Stats"]


class DeviceRegistry:
    """Device id -> the input partition its readings come from, so that a revoked partition's devices can
    be dropped from the operator's store (their state now belongs to the partition's new owner)."""

    def __init__(self) -> None:
        self._where: dict[str, TopicPart] = {}

    def __len__(self) -> int:
        return len(self._where)

    def note(self, device_partitions: dict[str, TopicPart]) -> None:
        self._where.update(device_partitions)

    def by_partition(self) -> dict[TopicPart, list[str]]:
        """The devices of each partition."""
        out: dict[TopicPart, list[str]] = {}
        for d, tp in self._where.items():
            out.setdefault(tp, []).append(d)
        return out

    def partitions_of(self, devices: Iterable[str]) -> dict[str, TopicPart]:
        return {d: self._where[d] for d in devices if d in self._where}

    def forget(self, devices: Iterable[str]) -> None:
        for d in devices:
            self._where.pop(d, None)

    def release(self, partitions: Iterable[TopicPart]) -> list[str]:
        """Forget and return the devices last seen on ``partitions``."""
        gone = set(partitions)
        devices = [d for d, tp in self._where.items() if tp in gone]
        self.forget(devices)
        return devices


class StateUndo:
    """A batch's devices' state before it ran (``before_process=undo.take``), put back if it aborts."""

    def __init__(self, store: DeviceStateStore) -> None:
        self.store, self.before, self.known, self.seen = store, b"", list[str](), list[str]()
        self._also: list[Callable[[], None]] = []

    def also(self, put_back: Callable[[T], None], saved: T) -> None:
        """Another piece of the batch's state to put back on :meth:`apply`: ``put_back(saved)``."""
        self._also.append(lambda: put_back(saved))

    def take(self, device_ids: Sequence[str]) -> None:
        self.seen = list(dict.fromkeys(device_ids))
        rows = self.store.lookup(self.seen)  # one vectorised lookup, not one ``in`` per device
        self.known = [d for d, r in zip(self.seen, rows.tolist(), strict=True) if r >= 0]
        self.before = self.store.snapshot(self.known)

    def apply(self) -> None:
        self.store.drop(set(self.seen) - set(self.known))
        if self.known:
            self.store.restore(self.before)
        for put_back in self._also:
            put_back()


@dataclass
class Stats:
    """Running counters of a worker; ``consumed == predictions + dead letters`` after every batch."""

    consumed: int = 0
    predictions: int = 0
    alerts: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    skipped_revoked: int = 0  # fetched for a partition revoked meanwhile: left for its new owner
    skipped_replayed: int = 0  # re-delivered, but already in the restored state (and its outputs delivered)
    aborted: int = 0  # transactions aborted (their batches were rewound and consumed again)
    restored_devices: int = 0  # device states read back from the changelog on assignment
    restore_s: float = 0.0  # seconds spent restoring
    busy_s: float = 0.0  # seconds spent handling batches (decode to commit; pipelined at-least-once: to hand-over)
    started: float = field(default_factory=time.monotonic)
    first_message: float | None = None  # monotonic seconds
    last_commit: float | None = None

    @property
    def balanced(self) -> bool:
        return self.consumed == self.predictions + sum(self.dead_letters.values())

    def add(self, out: BatchOutput, busy_s: float) -> None:
        self.consumed, self.predictions, self.alerts = (self.consumed + out.consumed,
                                                        self.predictions + out.predictions, self.alerts + out.alerts)
        self.dead_letters.update(out.dead_letters)
        self.batches, self.busy_s, self.last_commit = self.batches + 1, self.busy_s + busy_s, time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counters; ``events_per_s`` is over the active span (first message to last commit)."""
        now = time.monotonic()
        active = (self.last_commit or now) - (self.first_message or now)
        letters = self.dead_letters
        return {"consumed": self.consumed, "predictions": self.predictions, "alerts": self.alerts,
                "dead_letters": sum(letters.values()), "dead_letters_by_reason": dict(sorted(letters.items())),
                "late": letters[DeadLetterReason.LATE.value], "duplicates": letters[DeadLetterReason.DUPLICATE.value],
                "batches": self.batches, "skipped_revoked": self.skipped_revoked,
                "skipped_replayed": self.skipped_replayed, "aborted": self.aborted,
                "restored_devices": self.restored_devices, "restore_s": round(self.restore_s, 3),
                "balanced": self.balanced, "uptime_s": round(now - self.started, 3), "active_s": round(active, 3),
                "busy_s": round(self.busy_s, 3),
                "events_per_s": round(self.consumed / active, 1) if active > 0 else None,
                "busy_events_per_s": round(self.consumed / self.busy_s, 1) if self.busy_s > 0 else None}
