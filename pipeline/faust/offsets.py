"""Offset order for the faust agent: every input partition's events in order, none skipped.

faust 0.15 can drop fetched messages around a table recovery and then commit past them; the at-least-once
promise of :mod:`liquidstream.pipeline.faust.app` needs each partition's offsets to arrive without holes, so
:class:`OffsetGuard` checks them against the group's committed offset and seeks back when faust skipped some.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import faust
from faust.types import TP, EventT

from liquidstream.pipeline.settings import Settings

__all__ = ["METADATA_TIMEOUT_S", "Events", "OffsetGuard"]
log = logging.getLogger("liquidstream.faust")
METADATA_TIMEOUT_S = 15.0  # seconds for broker lookups
Events = list[EventT[Any]]


class OffsetGuard:
    """Each input partition's events in offset order, none skipped: faust 0.15 can drop fetched messages around a
    table recovery (DEVLOG: "DROPPED MESSAGE") and commit past them.  Behind the expected offset (first: the group's
    committed one): a redelivery, acked unprocessed.  Ahead: if the broker has records at the expected offset,
    faust skipped them and the partition is sought back (events fetched before stay unacked), else it is a hole."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.expected: dict[TP, int] = {}  # next offset per input partition
        self.rewound: dict[TP, int] = {}  # partitions sought back to this offset, until it arrives
        self.ticked: dict[TP, int | None] = {}  # expected offsets at the last :meth:`unstall`
        self.empty: dict[TP, tuple[int, int]] = {}  # (expected, highwater) found to be a trailing hole

    def _probe(self, tp: TP, offset: int | None) -> int | None:
        """The group's committed offset (``offset`` None), else the first offset at or after ``offset``."""
        from confluent_kafka import Consumer, TopicPartition

        probe = Consumer(self.settings.kafka_client_config() | {"group.id": self.app.conf.id,
                         "enable.auto.commit": False, "isolation.level": "read_uncommitted"})
        try:
            if offset is None:
                found = probe.committed([TopicPartition(tp.topic, tp.partition)], METADATA_TIMEOUT_S)[0].offset
                return found if found >= 0 else None
            probe.assign([TopicPartition(tp.topic, tp.partition, offset)])
            return next((m.offset() for m in probe.consume(1, METADATA_TIMEOUT_S) if m.error() is None), None)
        finally:
            probe.close()

    async def sort(self, events: Events) -> tuple[Events, Events]:
        """(events to process now, redeliveries to ack unprocessed); the others stay unacked."""
        ready, again = cast(tuple[Events, Events], ([], []))
        for event in events:
            tp, offset = event.message.tp, event.message.offset
            if tp not in self.expected:
                committed = await asyncio.to_thread(self._probe, tp, None)
                self.expected[tp] = offset if committed is None else committed
            want = self.expected[tp]
            if offset < want:
                again.append(event)  # a redelivery
                continue
            if offset > want and self.rewound.get(tp) == want:
                continue  # fetched before the seek back
            first = await asyncio.to_thread(self._probe, tp, want) if offset > want else None
            if first is not None and first < offset:
                log.warning("faust skipped %s[%d]@%d..%d: seeking back", tp.topic, tp.partition, want, offset - 1)
                self.rewound[tp] = want
                await self.app.consumer.seek(tp, want)
                continue
            self.rewound.pop(tp, None)
            self.expected[tp] = offset + 1
            ready.append(event)
        return ready, again

    async def unstall(self) -> None:
        """Timer, agent idle: a partition behind its highwater with no progress since the last call is sought
        back too (faust can set its read offset past messages it dropped; then none arrives to show a hole)."""
        tps = [tp for tp in self.app.consumer.assignment() if tp.topic == self.settings.input_topic]
        for tp, high in (await self.app.consumer.highwaters(*tps) if tps else {}).items():
            want = self.expected.get(tp)
            want = await asyncio.to_thread(self._probe, tp, None) if want is None else want
            if want is not None and want < high and self.ticked.get(tp) == want and self.empty.get(tp) != (want, high):
                if await asyncio.to_thread(self._probe, tp, want) is None:
                    self.empty[tp] = (want, high)  # a trailing hole (a transaction marker): not probed again
                else:
                    log.warning("faust stalled %s[%d] at %d < %d: seeking back", tp.topic, tp.partition, want, high)
                    self.rewound[tp] = want
                    await self.app.consumer.seek(tp, want)
            self.ticked[tp] = want

    def forget(self, tps: set[TP]) -> None:
        for mapping in (self.expected, self.rewound, self.ticked, self.empty):
            for tp in tps:
                mapping.pop(tp, None)
