"""The per-device state changelog: a compacted topic, one record per changed device per commit.

Topic ``settings.changelog`` (``<group_id>-state-changelog``): the input topic's partition count, compacted.
A device read from input partition *p* is written to changelog partition *p* (explicit partition), so
restoring input partition *p* reads changelog partition *p* only.  Per batch, in its transaction:

* key = device id (UTF-8), value = ``DeviceStateStore.snapshot([device_id])``; null (a tombstone) once the
  device is evicted;
* per input partition one *progress* record, key :data:`PROGRESS_KEY` (not UTF-8: never a device id), value
  ``{"topic", "partition", "offset"}``: every reading before ``offset`` is in the state; with the long input shape
  also ``"waiting"``, the channels consumed before ``offset`` that wait for their reading's other channels.
  A restore reads on until it has seen the progress the group committed.

Headers: ``ls.input.topic``, ``ls.input.partition``, ``ls.input.offset`` (next offset after the batch),
``ls.model.version``.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from liquidstream.operators.errors import StateFormatError
from liquidstream.operators.state.codec import FORMAT_VERSION, MAGIC, decode_snapshot, encode_snapshot
from liquidstream.operators.state.store import DeviceStateStore
from liquidstream.pipeline.errors import ConfigurationError, PipelineError
from liquidstream.pipeline.kafka.output import OutRecord
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.types import Headers, TopicPart

log = logging.getLogger("liquidstream.changelog")
H_TOPIC, H_PARTITION, H_OFFSET, H_MODEL = "ls.input.topic", "ls.input.partition", "ls.input.offset", "ls.model.version"
PROGRESS_KEY = b"\xffls.progress"
ADMIN_TIMEOUT_S = 30.0  # seconds for topic metadata and creation
#: Seconds to wait for the progress the group committed to become visible (transaction markers land on
#: the offsets topic and the changelog at nearly, not exactly, the same moment) before giving up.
PROGRESS_GRACE_S = 10.0
_PREFIX = struct.Struct("<8sHI")  # magic, format version, header length: see liquidstream.operators.state.codec


class StateLayout:
    """Per-device snapshot bytes, fast: one bulk snapshot split per device, many merged into one.

    ``store.snapshot([d])`` and ``decode_snapshot`` cost ~0.3 ms per device (a minute for 100k devices);
    single-device blobs of one store differ only in the id inside the JSON header and in the row bytes.
    """

    def __init__(self, store: DeviceStateStore) -> None:
        self.hidden_size, self.n_channels = store.hidden_size, store.n_channels
        header = json.loads(store.snapshot([])[_PREFIX.size:])
        self.fields = [(str(n), np.dtype(d), tuple(int(x) for x in s)) for n, d, s in header["fields"]]
        self._head = json.dumps({"hidden_size": self.hidden_size, "n_channels": self.n_channels,
                                 "devices": []}).encode()[:-2]  # b'{..., "devices": ['
        self._tail = b'], "fields": ' + json.dumps(header["fields"]).encode() + b"}"
        self._sizes = [d.itemsize * int(np.prod(s, dtype=np.int64)) for _, d, s in self.fields]
        self.row_bytes = sum(self._sizes)

    def split(self, blob: bytes) -> list[tuple[str, bytes]]:
        """(device id, its own ``snapshot([id])`` bytes) for every device of a bulk snapshot."""
        ids, arrays = decode_snapshot(blob, hidden_size=self.hidden_size, n_channels=self.n_channels)
        n = len(ids)
        rows = np.concatenate([np.ascontiguousarray(arrays[name]).reshape(n, -1).view(np.uint8)
                               for name, _, _ in self.fields], axis=1) if n else np.empty((0, 0), np.uint8)
        out = []
        for i, device in enumerate(ids):
            header = self._head + json.dumps(device).encode() + self._tail
            out.append((device, _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + rows[i].tobytes()))
        return out

    def merge(self, blobs: Mapping[str, bytes]) -> bytes:
        """One snapshot of every device's single-device blob (device id -> changelog value)."""
        for key, blob in blobs.items():
            if self._device_of(blob) != key:
                msg = f"changelog value of device {key!r} is not a single-device state snapshot of this model"
                raise StateFormatError(msg)
        table = np.frombuffer(b"".join(b[len(b) - self.row_bytes:] for b in blobs.values()), dtype=np.uint8)
        table = table.reshape(len(blobs), self.row_bytes)
        arrays: dict[str, np.ndarray] = {}
        start = 0
        for (name, dtype, shape), size in zip(self.fields, self._sizes, strict=True):
            arrays[name] = table[:, start:start + size].copy().view(dtype).reshape((len(blobs), *shape))
            start += size
        return encode_snapshot(list(blobs), arrays, hidden_size=self.hidden_size, n_channels=self.n_channels)

    def _device_of(self, blob: bytes) -> str | None:
        """The device id of a single-device blob in exactly this layout, else None."""
        if len(blob) < _PREFIX.size:
            return None
        magic, version, hlen = _PREFIX.unpack_from(blob)
        header = blob[_PREFIX.size:_PREFIX.size + hlen]
        if magic != MAGIC or version != FORMAT_VERSION or len(blob) != _PREFIX.size + hlen + self.row_bytes \
                or not header.startswith(self._head) or not header.endswith(self._tail):
            return None
        try:
            device = json.loads(header[len(self._head):len(header) - len(self._tail)])
        except ValueError:  # several ids, or none
            return None
        return device if isinstance(device, str) else None


def _headers(topic: str, partition: int, offset: int, model_version: str) -> Headers:
    return [(H_TOPIC, topic.encode()), (H_PARTITION, str(partition).encode()), (H_OFFSET, str(offset).encode()),
            (H_MODEL, model_version.encode())]


def changelog_records(layout: StateLayout, store: DeviceStateStore, devices: Mapping[str, TopicPart],
                      commits: Mapping[TopicPart, int], topic: str, model_version: str,
                      waiting: Mapping[TopicPart, dict[str, Any] | None] | None = None) -> list[OutRecord]:
    """The state of each device of ``devices`` (id -> input partition) plus one progress record per
    partition of ``commits`` (-> next input offset), each pinned to its input partition's number; ``waiting``:
    the long input shape's channels waiting per partition (:mod:`~liquidstream.pipeline.kafka.long_input`), in
    the progress record as ``"waiting"``."""
    out, headers = [], {tp: _headers(*tp, offset, model_version) for tp, offset in commits.items()}
    for device, blob in layout.split(store.snapshot(list(devices))):  # snapshot skips unknown ids
        tp = devices[device]  # one headers list per partition, shared by its records (nothing mutates them)
        if tp not in headers:  # a change outside a batch (a silence the timer opened): no input offset
            headers[tp] = _headers(*tp, -1, model_version)
        out.append(OutRecord(topic, device.encode(), blob, headers[tp], tp[1]))
    for (t, p), offset in sorted(commits.items()):
        doc: dict[str, Any] = {"topic": t, "partition": p, "offset": offset}
        if waiting is not None and waiting.get((t, p)) is not None:
            doc["waiting"] = waiting[(t, p)]
        value = json.dumps(doc).encode()
        out.append(OutRecord(topic, PROGRESS_KEY, value, _headers(t, p, offset, model_version), p))
    return out


def tombstones(devices: Mapping[str, TopicPart], topic: str) -> list[OutRecord]:
    """Null-valued records: compaction deletes the devices' state, restore forgets them."""
    return [OutRecord(topic, d.encode(), None, None, p) for d, (_, p) in devices.items()]


def _partitions(admin: AdminClient, topic: str) -> int | None:
    meta = admin.list_topics(topic=topic, timeout=ADMIN_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        return None
    return len(meta.partitions) if all(p.leader >= 0 for p in meta.partitions.values()) else None


def ensure_topic(admin: AdminClient, settings: Settings) -> int:
    """Create the changelog topic if missing (compacted, the input topic's partition count); return it."""
    want, topic = _partitions(admin, settings.input_topic), settings.changelog
    if want is None:
        msg = f"input topic {settings.input_topic} does not exist (or has partitions without a leader)"
        raise ConfigurationError(msg)
    have = _partitions(admin, topic)
    if have is None:
        new = NewTopic(topic, num_partitions=want, replication_factor=-1, config={"cleanup.policy": "compact"})
        try:
            admin.create_topics([new])[topic].result(ADMIN_TIMEOUT_S)
            log.info("created changelog topic %s (%d partitions, compacted)", topic, want)
        except KafkaException as ex:
            if ex.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another worker was quicker: fine
                msg = f"cannot create changelog topic {topic} ({want} partitions): {ex}"
                raise PipelineError(msg) from ex
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while (have := _partitions(admin, topic)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    if have is None or have < want:
        msg = f"changelog topic {topic} has {have} partition(s), input topic {settings.input_topic} has {want}"
        raise ConfigurationError(msg)
    return want


@dataclass
class Restored:
    """What a changelog read found: the last state per device, and the progress per partition."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)
    progress: dict[int, int] = field(default_factory=dict)  # partition -> input offset reflected
    waiting: dict[int, dict[str, Any]] = field(default_factory=dict)  # partition -> long shape's waiting channels
    model_version: dict[str, str] = field(default_factory=dict)  # device -> model version that wrote it
    records: int = 0


def restore_consumer(settings: Settings) -> Consumer:
    """A consumer outside any group (assign only, never commits) that sees committed transactions only;
    ``earliest``: compaction may move a log start offset between the watermark query and the fetch."""
    return Consumer(settings.kafka_client_config() | {
        "group.id": f"{settings.group_id}-restore", "enable.auto.commit": False, "enable.partition.eof": True,
        "auto.offset.reset": "earliest", "isolation.level": "read_committed", "fetch.max.bytes": 64 * 1024 * 1024,
        "fetch.wait.max.ms": 10})  # at the end of a partition, say so now rather than after a 500 ms long poll


def read_changelog(consumer: Consumer, topic: str, need: Mapping[int, int], timeout_s: float) -> Restored:
    """Read partitions ``need`` (partition -> input offset the group committed, -1 if none) from the start to
    their end (the last stable offset, as the consumer is ``read_committed``): last record per key wins,
    tombstones delete.  Reads on while a partition's progress is behind what the group committed."""
    out, started, eof = Restored(), time.monotonic(), dict[int, int]()
    try:  # from the log start offset: OFFSET_BEGINNING costs a lookup and ~0.5 s before the first fetch
        marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s) for p in need}
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in marks.items()])
        ends, todo = {p: high for p, (_, high) in marks.items()}, set(need)
        while todo:
            for m in consumer.consume(num_messages=10_000, timeout=0.05):
                _take(m, out, eof, topic)
            for p in list(todo):
                if ends[p] > 0 and max(eof.get(p, -1), _position(consumer, topic, p)) < ends[p]:
                    continue  # not at the end yet
                if out.progress.get(p, -1) >= need[p]:
                    todo.discard(p)
                    continue
                waited = time.monotonic() - started
                if waited > PROGRESS_GRACE_S and p not in out.progress:
                    log.warning("changelog %s[%d] has no progress record, the group committed input offset %d:"
                                " its devices start from empty state (changelog new or deleted?)", topic, p,
                                need[p])
                    todo.discard(p)
                elif waited > timeout_s:
                    msg = (f"changelog {topic}[{p}] reflects input up to offset {out.progress.get(p)}, but the "
                           f"group committed offset {need[p]}: state records are missing")
                    raise PipelineError(msg)
                else:  # the committing transaction's markers are still landing: ask for the new end
                    ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
    except KafkaException as ex:
        msg = f"reading changelog {topic} partitions {sorted(need)} failed: {ex}"
        raise PipelineError(msg) from ex
    finally:
        consumer.unassign()
    return out


def _position(consumer: Consumer, topic: str, partition: int) -> int:
    return int(consumer.position([TopicPartition(topic, partition)])[0].offset)


def _take(m: Any, out: Restored, eof: dict[int, int], topic: str) -> None:
    """Fold one consumed changelog message into ``out``."""
    p, err = m.partition() or 0, m.error()
    if err is not None:
        if err.code() == KafkaError._PARTITION_EOF:
            eof[p] = max(eof.get(p, -1), m.offset() or 0)
        elif err.fatal() or not err.retriable():
            msg = f"reading changelog {topic}[{p}] at offset {m.offset()} failed: {err.str()}"
            raise PipelineError(msg)
        return
    key, value = m.key() or b"", m.value()
    if key == PROGRESS_KEY:  # the last one wins, as after compaction
        doc = json.loads(value or b"{}")
        out.progress[p] = int(doc.get("offset", -1))
        if doc.get("waiting") is None:
            out.waiting.pop(p, None)
        else:
            out.waiting[p] = doc["waiting"]
        return
    device = key.decode("utf-8", "replace")
    out.records += 1
    if value is None:
        for table in (out.blobs, out.partition_of, out.model_version):
            table.pop(device, None)
        return
    out.blobs[device], out.partition_of[device] = value, p
    for name, v in m.headers() or ():
        if name == H_MODEL and isinstance(v, bytes):
            out.model_version[device] = v.decode("utf-8", "replace")
