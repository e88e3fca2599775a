"""The ``long`` input shape: one message per channel reading, assembled per device and event time.

A reading is emitted once every channel of ``channel_fields`` arrived for its device and time (in any order, other
devices' messages in between); it then meets the same checks as any reading, and a failure dead-letters each of
its messages with that reason.  A partial reading is never emitted (the model needs every channel): a repeated
channel of a device and time (before or after its reading was emitted) is a ``duplicate`` dead letter (the first
value counts), and channels still waiting are ``incomplete`` dead letters, one per message, once the input ends
(a file) or once their device's event time moved on by more than ``mapping.assembly_window_s`` (a topic).  Each
message is thus either part of an emitted reading or dead-lettered: ``messages = assembled + rejected``.

:class:`LongAssembler` keeps the channels waiting between calls; each part carries a *ref* chosen by the caller (a
line number for a file, the whole message for a topic, so that it can be dead-lettered batches later).  The Kafka
worker keeps one assembler per input partition and writes its state with the partition's progress record
(:mod:`liquidstream.pipeline.kafka.long_input`), so a restart resumes the same assembly.

>>> from liquidstream.pipeline.wire.mapping import InputMapping
>>> m = InputMapping(shape="long", device_field="device", channel_fields=("temp", "rpm"))
>>> limits = DecodeLimits(n_channels=2, max_payload_bytes=1024, ts_min_ms=0, max_future_ms=0, mapping=m)
>>> msgs = [b'{"device": "p", "ts": 5, "channel": "rpm", "value": 1480}', b'{"device": "q", "ts": 5, "channel": "temp",'
...         b' "value": 1}', b'{"device": "p", "ts": 5, "channel": "temp", "value": 41.5}']
>>> batch, assembled = assemble_long(msgs, None, limits, now_ms=10)
>>> batch.index.tolist(), batch.device_ids, batch.values.tolist(), assembled
([2], ['p'], [[41.5, 1480.0]], 2)
>>> [(r.index, r.reason.value) for r in batch.rejects]
[(1, 'incomplete')]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from liquidstream.pipeline.errors import DecodeError
from liquidstream.pipeline.wire.checks import DecodeLimits, Rejected, check_reading, load_payload, non_finite_detail
from liquidstream.pipeline.wire.codec import DecodedBatch, Reject
from liquidstream.pipeline.wire.reshape import long_part
from liquidstream.pipeline.wire.schemas import DeadLetterReason

__all__ = ["Assembled", "LongAssembler", "assemble_long"]

R = TypeVar("R")
Slot = tuple[Any, int]  # (device as read, event time in epoch ms)


@dataclass
class Waiting(Generic[R]):
    """The channels of one device and time read so far: value and ref per channel, None while missing."""

    values: list[Any]
    refs: list[R | None]


@dataclass
class Assembled(Generic[R]):
    """One call's outcome: the readings completed (``index``: the payload of this call that completed each) and
    every rejected part with its ref, reason and detail; ``parts``: how many parts went into the readings."""

    batch: DecodedBatch
    rejects: list[tuple[R, DeadLetterReason, str]] = field(default_factory=list)
    parts: int = 0


class LongAssembler(Generic[R]):
    """Channels waiting per device and time, across calls (see the module docstring)."""

    def __init__(self, limits: DecodeLimits, window_ms: int | None = None) -> None:
        """``window_ms``: how far (event time, ms) a device may move on before its unfinished reading is given up
        (a topic); None: wait until :meth:`expire` ``(final=True)`` (a file)."""
        if limits.mapping.shape != "long":
            msg = f"LongAssembler reads the long shape, not {limits.mapping.shape!r}"
            raise DecodeError(msg)
        self.limits, self.channels, self.window_ms = limits, limits.mapping.channel_fields, window_ms
        self.waiting: dict[Slot, Waiting[R]] = {}  # insertion order = arrival order of each slot's first part
        self.emitted: dict[Slot, None] = {}  # slots already emitted (a repeat is a duplicate), pruned by expire()
        self.latest: dict[Any, int] = {}  # device -> its newest event time seen (ms), while it has slots

    def feed(self, payloads: Sequence[bytes | None], keys: Sequence[bytes | None] | None, refs: Sequence[R],
             now_ms: int) -> Assembled[R]:
        """Add one call's messages; ``refs[i]`` names payload ``i`` in rejects, now or in a later call."""
        limits, n, mapping = self.limits, len(self.channels), self.limits.mapping
        if keys is None and limits.require_key:
            limits = dataclasses.replace(limits, require_key=False)  # no keys at all (a file): nothing to require
        min_ts, max_ts = limits.ts_min_ms, now_ms + limits.max_future_ms
        rows: list[tuple[int, str, int, list[Any]]] = []
        rejects: list[tuple[R, DeadLetterReason, str]] = []
        assembled = 0
        for i, payload in enumerate(payloads):
            key = None if keys is None else keys[i]
            try:
                device, ts, j, value = long_part(mapping, load_payload(payload, limits), key)
                if not isinstance(device, str | int | float):  # unhashable: the reading check words it
                    check_reading({"device_id": device, "ts": ts, "values": [value]}, None, limits, min_ts, max_ts)
                newest = self.latest.get(device, ts)
                if self.window_ms is not None and ts < newest - self.window_ms:  # whatever the batch boundaries
                    raise Rejected(DeadLetterReason.INCOMPLETE, self._late(device, ts, [self.channels[j]]))
                if (device, ts) in self.emitted:
                    detail = f"device {device!r:.64} at ts {ts}: its reading was already assembled and emitted"
                    raise Rejected(DeadLetterReason.DUPLICATE, detail)
                slot = self.waiting.get((device, ts))
                if slot is None:
                    slot = self.waiting[(device, ts)] = Waiting([None] * n, [None] * n)
                    self.latest[device] = max(newest, ts)
                elif slot.refs[j] is not None:
                    detail = f"channel {self.channels[j]!r} of device {device!r:.64} at ts {ts} was already read"
                    raise Rejected(DeadLetterReason.DUPLICATE, detail)
            except Rejected as rej:
                rejects.append((refs[i], rej.reason, rej.detail))
                continue
            slot.values[j], slot.refs[j] = value, refs[i]
            if any(r is None for r in slot.refs):
                continue
            del self.waiting[(device, ts)]
            self.emitted[(device, ts)] = None
            parts = [r for r in slot.refs if r is not None]
            try:
                reading = {"device_id": device, "ts": ts, "values": slot.values, "channels": list(self.channels)}
                device_id, ts_ms, vals, _ = check_reading(reading, key, limits, min_ts, max_ts)
                bad = non_finite_detail(vals)
                if bad is not None:
                    raise Rejected(DeadLetterReason.NON_FINITE, bad)
            except Rejected as rej:
                rejects.extend((r, rej.reason, rej.detail) for r in parts)
                continue
            rows.append((i, device_id, ts_ms, vals))
            assembled += n
        values32 = np.array([r[3] for r in rows], dtype=np.float64).reshape(len(rows), n).astype(np.float32)
        batch = DecodedBatch(index=np.array([r[0] for r in rows], dtype=np.int64), device_ids=[r[1] for r in rows],
                             ts_ms=np.array([r[2] for r in rows], dtype=np.int64),
                             values=np.ascontiguousarray(values32), channels=[list(self.channels)] * len(rows),
                             rejects=[])
        return Assembled(batch, rejects, assembled)

    def expire(self, final: bool = False) -> list[tuple[R, DeadLetterReason, str]]:
        """Give up on slots older than their device's newest event time by more than the window (``final``: all of
        them, the input ended): their parts are ``incomplete`` rejects.  Emitted slots that old are forgotten."""
        window = None if final else self.window_ms
        if window is None and not final:
            return []
        out: list[tuple[R, DeadLetterReason, str]] = []
        for (device, ts), slot in list(self._older(self.waiting, window)):
            del self.waiting[(device, ts)]
            missing = [c for c, r in zip(self.channels, slot.refs, strict=True) if r is None]
            detail = f"device {device!r:.64} at ts {ts}: the input ended without channel(s) {', '.join(missing)}" \
                if window is None else self._late(device, ts, missing)
            out.extend((r, DeadLetterReason.INCOMPLETE, detail) for r in slot.refs if r is not None)
        for key, _ in list(self._older(self.emitted, window)):
            del self.emitted[key]
        live = {d for d, _ in self.waiting} | {d for d, _ in self.emitted}
        self.latest = {d: t for d, t in self.latest.items() if d in live}
        return out

    def _late(self, device: Any, ts: int, missing: list[str]) -> str:
        return (f"device {device!r:.64} at ts {ts}: its event time moved on by more than {self.window_ms}"
                f" ms (mapping.assembly_window_s) without channel(s) {', '.join(missing)}")

    def _older(self, table: dict[Slot, Any], window_ms: int | None) -> Iterator[tuple[Slot, Any]]:
        for (device, ts), item in table.items():
            if window_ms is None or ts < self.latest.get(device, ts) - window_ms:
                yield (device, ts), item

    def __len__(self) -> int:
        """Slots waiting for channels."""
        return len(self.waiting)


def assemble_long(payloads: Sequence[bytes | None], keys: Sequence[bytes | None] | None, limits: DecodeLimits,
                  now_ms: int) -> tuple[DecodedBatch, int]:
    """A whole input (a file) at once: the readings assembled (``index``: the message that completed each) and how
    many messages went into them; rejects name every other message."""
    assembler = LongAssembler[int](limits)
    got = assembler.feed(payloads, keys, range(len(payloads)), now_ms)
    rejects = [Reject(i, reason, detail) for i, reason, detail in [*got.rejects, *assembler.expire(final=True)]]
    return dataclasses.replace(got.batch, rejects=sorted(rejects, key=lambda r: r.index)), got.parts
