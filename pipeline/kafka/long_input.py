"""The long input shape on a topic: one assembly per input partition, kept across batches and restarts.

A reading of the long shape arrives as one message per channel (:mod:`liquidstream.pipeline.wire.assembly`).  The
channels of one device and time may straddle batches, so each input partition keeps a
:class:`~liquidstream.pipeline.wire.assembly.LongAssembler` whose parts carry their whole message (:class:`Part`): a
part dead-lettered batches later (``incomplete``) is still the message that was consumed.  Messages of one device
must share a partition (key the topic by device, as for every shape).

Durability: the assembler's state goes into the partition's changelog *progress* record, written in the same
transaction (exactly-once) or the same produce call (at-least-once) as the offsets it reflects
(:mod:`liquidstream.pipeline.kafka.changelog`).  A restart restores it with the devices' state, so the parts consumed
before the crash and waiting for their siblings are neither lost nor read twice.  An aborted transaction rewinds it
with the devices (:meth:`StreamAssembly.save` / :meth:`StreamAssembly.load`).

The state of a partition is capped at :data:`MAX_STATE_BYTES` of JSON (the progress record must stay well under
Kafka's default 1 MiB message size): beyond it, the oldest waiting readings are given up as ``incomplete``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from liquidstream.pipeline.wire.assembly import LongAssembler, Waiting
from liquidstream.pipeline.wire.codec import DecodedBatch, DecodeLimits
from liquidstream.pipeline.wire.dead_letters import OriginalHeaders, forwarded_headers
from liquidstream.pipeline.wire.schemas import DeadLetterReason
from liquidstream.pipeline.wire.types import MessageLike, SourceCoords, TopicPart

__all__ = ["MAX_STATE_BYTES", "Part", "StreamAssembly", "kafka_timestamp"]

#: Most JSON bytes one partition's assembly state may take in its progress record.
MAX_STATE_BYTES = 512 * 1024
Letter = tuple["Part", DeadLetterReason, str]


class Part(NamedTuple):
    """One consumed message of the long shape, whole: enough to dead-letter it later, even after a restart."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int  # the message's Kafka timestamp, epoch ms (0: none)
    headers: OriginalHeaders  # as the dead letter takes them: a list, or the message's own reader (not yet read)

    @classmethod
    def of(cls, message: MessageLike, where: SourceCoords) -> Part:
        """A consumed message, its headers read now (it may wait): unreadable ones are dropped, as a dead letter
        would (:func:`~liquidstream.pipeline.wire.dead_letters.forwarded_headers`)."""
        headers, _ = forwarded_headers(message.headers)
        return cls(*where, message.key(), message.value(), kafka_timestamp(message), headers or None)

    def to_json(self) -> list[Any]:
        headers = self.headers() if callable(self.headers) else self.headers
        return [self.topic, self.partition, self.offset, _b64(self.key), _b64(self.value), self.timestamp_ms,
                None if headers is None else [[k, _b64(v)] for k, v in headers]]

    @classmethod
    def from_json(cls, doc: list[Any]) -> Part:
        topic, partition, offset, key, value, ts, headers = doc
        return cls(str(topic), int(partition), int(offset), _unb64(key), _unb64(value), int(ts),
                   None if headers is None else [(str(k), _unb64(v)) for k, v in headers])


def kafka_timestamp(message: MessageLike) -> int:
    """A consumed message's Kafka timestamp, epoch ms, or 0 when it has none."""
    kind, ts = message.timestamp()
    return ts if kind and ts > 0 else 0


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


class StreamAssembly:
    """One :class:`LongAssembler` per input partition; ``window_ms``: how far a device's event time may move on
    before its unfinished reading is given up (``mapping.assembly_window_s``, in milliseconds); ``max_bytes``: the
    most JSON bytes of one partition's state."""

    def __init__(self, limits: DecodeLimits, window_ms: int, max_bytes: int = MAX_STATE_BYTES) -> None:
        self.limits, self.window_ms, self.max_bytes = limits, window_ms, max_bytes
        self.parts: dict[TopicPart, LongAssembler[Part]] = {}

    def decode(self, messages: Sequence[MessageLike], src: Sequence[SourceCoords],
               now_ms: int) -> tuple[DecodedBatch, list[Letter]]:
        """The readings this batch completed (``index``: the batch message that completed each, in batch order)
        and every part given up, from this batch or an earlier one."""
        by_tp: dict[TopicPart, list[int]] = {}
        for i, (t, p, _) in enumerate(src):
            by_tp.setdefault((t, p), []).append(i)
        done: list[tuple[np.ndarray, DecodedBatch]] = []
        letters: list[Letter] = []
        for tp, rows in by_tp.items():
            assembler = self.parts.setdefault(tp, LongAssembler[Part](self.limits, self.window_ms))
            got = assembler.feed([messages[i].value() for i in rows], [messages[i].key() for i in rows],
                                 [Part.of(messages[i], src[i]) for i in rows], now_ms)
            letters += got.rejects + assembler.expire() + self._fit(tp)
            done.append((np.asarray(rows, dtype=np.int64)[got.batch.index], got.batch))
        return _merge(done, self.limits.n_channels), letters

    def state(self, tp: TopicPart) -> dict[str, Any] | None:
        """The partition's assembly as JSON-able data (for its progress record); None when nothing waits."""
        assembler = self.parts.get(tp)
        if assembler is None or not (assembler.waiting or assembler.emitted):
            return None
        return {"waiting": [[d, ts, w.values, [None if r is None else r.to_json() for r in w.refs]]
                            for (d, ts), w in assembler.waiting.items()],
                "emitted": [[d, ts] for d, ts in assembler.emitted]}

    def restore(self, tp: TopicPart, doc: dict[str, Any] | None) -> None:
        """Replace the partition's assembly with ``doc`` (from :meth:`state`; None: empty)."""
        assembler = self.parts[tp] = LongAssembler[Part](self.limits, self.window_ms)
        for d, ts, values, refs in (doc or {}).get("waiting", []):
            assembler.waiting[(d, int(ts))] = Waiting(list(values), [None if r is None else Part.from_json(r)
                                                                     for r in refs])
        for d, ts in (doc or {}).get("emitted", []):
            assembler.emitted[(d, int(ts))] = None
        for d, ts in [*assembler.waiting, *assembler.emitted]:  # the newest slot is never expired: max = newest
            assembler.latest[d] = max(assembler.latest.get(d, ts), ts)

    def drop(self, tps: Iterable[TopicPart]) -> None:
        for tp in tps:
            self.parts.pop(tp, None)

    def save(self, tps: Iterable[TopicPart]) -> dict[TopicPart, dict[str, Any] | None]:
        """The partitions' states before a batch (an abort rewinds with :meth:`load`)."""
        return {tp: json.loads(json.dumps(self.state(tp))) for tp in tps}

    def load(self, saved: dict[TopicPart, dict[str, Any] | None]) -> None:
        for tp, doc in saved.items():
            self.restore(tp, doc)

    def _fit(self, tp: TopicPart) -> list[Letter]:
        """Give up the oldest waiting readings until the partition's state fits ``max_bytes``."""
        assembler, out = self.parts[tp], list[Letter]()
        while assembler.waiting and len(json.dumps(self.state(tp))) > self.max_bytes:
            (device, ts), slot = next(iter(assembler.waiting.items()))
            del assembler.waiting[(device, ts)]
            detail = (f"device {device!r:.64} at ts {ts}: given up unfinished, the partition's waiting readings "
                      f"exceeded {self.max_bytes} bytes of state")
            out.extend((r, DeadLetterReason.INCOMPLETE, detail) for r in slot.refs if r is not None)
        return out


def _merge(parts: list[tuple[np.ndarray, DecodedBatch]], n_channels: int) -> DecodedBatch:
    """Per-partition decoded batches as one, rows in batch-message order (each device's order is its partition's)."""
    index = np.concatenate([i for i, _ in parts]) if parts else np.empty(0, np.int64)
    order = np.argsort(index, kind="stable")
    ids = [d for _, b in parts for d in b.device_ids]
    channels = [c for _, b in parts for c in b.channels]
    values = np.concatenate([b.values for _, b in parts]) if parts else np.empty((0, n_channels), np.float32)
    ts = np.concatenate([b.ts_ms for _, b in parts]) if parts else np.empty(0, np.int64)
    return DecodedBatch(index=index[order], device_ids=[ids[k] for k in order.tolist()], ts_ms=ts[order],
                        values=np.ascontiguousarray(values[order]), channels=[channels[k] for k in order.tolist()],
                        rejects=[])
