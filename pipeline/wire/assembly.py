"""The ``long`` input shape: one message per channel reading, assembled per device and event time.

A reading is emitted once every channel of ``channel_fields`` arrived for its device and time (in any order, other
devices' messages in between); it then meets the same checks as any reading, and a failure dead-letters each of
its messages with that reason.  A partial reading is never emitted (the model needs every channel): a repeated
channel of a device and time (before or after its reading was emitted) is a ``duplicate`` dead letter (the first
value counts), and the channels still
waiting when the input ends are ``incomplete`` dead letters, one per message.  Each message is thus either part
of an emitted reading or dead-lettered: ``messages = assembled + rejected``.

For files (``replay``, ``train``): the whole input is one assembly.  The Kafka worker does not read the long shape
yet (an assembly spanning batches needs its pending channels in the changelog and offsets held back with them).

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
from collections.abc import Sequence
from typing import Any

import numpy as np

from liquidstream.pipeline.errors import DecodeError
from liquidstream.pipeline.wire.checks import DecodeLimits, Rejected, check_reading, load_payload, non_finite_detail
from liquidstream.pipeline.wire.codec import DecodedBatch, Reject
from liquidstream.pipeline.wire.reshape import long_part
from liquidstream.pipeline.wire.schemas import DeadLetterReason

__all__ = ["assemble_long"]


def assemble_long(payloads: Sequence[bytes | None], keys: Sequence[bytes | None] | None, limits: DecodeLimits,
                  now_ms: int) -> tuple[DecodedBatch, int]:
    """The readings assembled from ``payloads`` (``index``: the message that completed each) and how many
    messages went into them; rejects name every other message."""
    mapping = limits.mapping
    if mapping.shape != "long":
        msg = f"assemble_long reads the long shape, not {mapping.shape!r}"
        raise DecodeError(msg)
    if keys is None and limits.require_key:
        limits = dataclasses.replace(limits, require_key=False)  # no keys at all (a file): nothing to require
    n = len(mapping.channel_fields)
    min_ts, max_ts = limits.ts_min_ms, now_ms + limits.max_future_ms
    pending: dict[tuple[Any, int], tuple[list[Any], list[int]]] = {}
    done: set[tuple[Any, int]] = set()  # device and time of every reading assembled (a repeat is a duplicate)
    rows: list[tuple[int, str, int, list[Any]]] = []
    rejects: list[Reject] = []
    assembled = 0
    for i, payload in enumerate(payloads):
        key = None if keys is None else keys[i]
        try:
            device, ts, j, value = long_part(mapping, load_payload(payload, limits), key)
            if not isinstance(device, str | int | float):  # unhashable: the reading check words it
                check_reading({"device_id": device, "ts": ts, "values": [value]}, None, limits, min_ts, max_ts)
            if (device, ts) in done:
                detail = f"device {device!r:.64} at ts {ts}: its reading was already assembled and emitted"
                raise Rejected(DeadLetterReason.DUPLICATE, detail)
            values, where = pending.setdefault((device, ts), ([None] * n, [-1] * n))
            if where[j] >= 0:
                detail = f"channel {mapping.channel_fields[j]!r} of device {device!r:.64} at ts {ts} was already read"
                raise Rejected(DeadLetterReason.DUPLICATE, detail)
        except Rejected as rej:
            rejects.append(Reject(i, rej.reason, rej.detail))
            continue
        values[j], where[j] = value, i
        if min(where) < 0:
            continue
        del pending[(device, ts)]
        done.add((device, ts))
        try:
            reading = {"device_id": device, "ts": ts, "values": values, "channels": list(mapping.channel_fields)}
            device_id, ts_ms, vals, _ = check_reading(reading, key, limits, min_ts, max_ts)
            bad = non_finite_detail(vals)
            if bad is not None:
                raise Rejected(DeadLetterReason.NON_FINITE, bad)
        except Rejected as rej:
            rejects.extend(Reject(k, rej.reason, rej.detail) for k in where)
            continue
        rows.append((i, device_id, ts_ms, vals))
        assembled += n
    for (device, ts), (_, where) in pending.items():
        missing = [c for c, k in zip(mapping.channel_fields, where, strict=True) if k < 0]
        detail = f"device {device!r:.64} at ts {ts}: the input ended without channel(s) {', '.join(missing)}"
        rejects.extend(Reject(k, DeadLetterReason.INCOMPLETE, detail) for k in where if k >= 0)
    rejects.sort(key=lambda r: r.index)
    values32 = np.array([r[3] for r in rows], dtype=np.float64).reshape(len(rows), n).astype(np.float32)
    batch = DecodedBatch(index=np.array([r[0] for r in rows], dtype=np.int64), device_ids=[r[1] for r in rows],
                         ts_ms=np.array([r[2] for r in rows], dtype=np.int64), values=np.ascontiguousarray(values32),
                         channels=[list(mapping.channel_fields)] * len(rows), rejects=rejects)
    return batch, assembled
