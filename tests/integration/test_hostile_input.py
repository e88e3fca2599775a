"""Hostile input end to end: ``liquidstream run`` (subprocess, untrained 4-channel model) under both guarantees.

A seeded generator mixes valid readings of a dozen devices (unicode, NUL-bearing and 256-character ids) with
hostile messages the codec unit tests do not send through Kafka: tombstones, null keys, wrong keys, empty
and non-UTF-8 payloads, BOMs, arrays/scalars/nested objects, duplicate JSON keys, 1e400, ``"NaN"`` strings,
booleans, int64-overflowing/negative/float/seconds timestamps, payloads one byte either side of
``max_payload_bytes``, binary junk and forged ``ls.*`` headers, mixed value lengths, adjacent exact
duplicates and readings re-sent after their device moved on (late), plus records the DLQ producer cannot
take whole: a 2.5 MB compressible payload, one at the default producer's size limit, a 1.2 MB key, a 1.2 MB
header.

Every input (partition, offset) must come out exactly once, as a prediction (``source``) or a dead letter
(``ls.source.*``) with the specific class and detail expected for it, original key/value bytes intact
(or, past the dead-letter size budget, a prefix that ``ls.truncated`` accounts for), original headers
forwarded minus ``ls.*``; the worker exits 0 with balanced stats.

Determinism: every message goes to an explicit partition (one per device), and a late reading sits at least
:data:`LATE_GAP` offsets behind the reading it is late against, more than one batch
(:data:`BATCH`): within a batch the operator applies a device's readings in event-time order, so only
across batches is an out-of-order reading late.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import unicodedata
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from liquidstream.pipeline.wire.dead_letters import (
    HEADER_CLASS,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_PREFIX,
    HEADER_REASON,
    HEADER_TOPIC,
    HEADER_TRUNCATED,
    HEADER_UNREADABLE,
    MAX_DEAD_LETTER_BYTES,
    parse_dead_letter_headers,
)
from tests.integration.conftest import PARTITIONS, Topics, cli, drain_messages, finish, spawn

pytestmark = pytest.mark.integration

SEED = 20_261_205
STEPS = 2600  # generator steps: about 2,000 valid readings and 700 hostile messages
BATCH = 100  # --batch-max-messages
LATE_GAP = 3 * BATCH  # offsets in a partition between a late reading and the one it is late against
MAX_PAYLOAD = 64 * 1024  # the worker's default max_payload_bytes
CHANNELS = 4
PRODUCER_LIMIT_VALUE = 999_900  # about the largest value librdkafka's default message.max.bytes lets through
DEVICES = ["pump-0", "pump-1", "pump-2", "pump-3", "valve-4", "fan-5", "pompe-é", "泵-7", "🚀 rocket-8",
           "nul\x00byte-9", "d" * 256, "é" * 255 + "x"]
JUNK_HEADERS: list[tuple[str, bytes | None]] = [("trace", b"\x00\xff\xfe\x80binary"), ("null-header", None),
                                                 ("ünïcode-name", b"\xc3\x28"), ("ls.error.class", b"forged")]
Coord = tuple[int, int]
Hdrs = list[tuple[str, bytes | None]]


@dataclass
class Case:
    """One input message and what the worker must make of it (``expect``: "prediction" or a DLQ class)."""

    partition: int
    key: bytes | None
    value: bytes | None
    expect: str
    detail: str = ""  # substring of ls.error.reason
    headers: list[tuple[str, bytes | None]] | None = None
    kind: str = ""


@dataclass
class Device:
    name: str
    partition: int
    ts: int  # event time of its last applied reading, epoch ms
    applied: list[tuple[int, int, bytes]] = field(default_factory=list)  # (partition position, ts, bytes)


def _reading(device: Any, ts: Any, values: Any, **extra: Any) -> bytes:
    return json.dumps({"device_id": device, "ts": ts, "values": values, **extra}, ensure_ascii=False).encode()


def _padded(reading: bytes, size: int) -> bytes:
    """``reading`` (with ``"pad": ""``) padded to exactly ``size`` bytes."""
    out = reading.replace(b'"pad": ""', b'"pad": "' + b"p" * (size - len(reading)) + b'"')
    assert len(out) == size
    return out


class Generator:
    """Seeded hostile stream; knows, for every message, the outcome the contract calls for."""

    def __init__(self, seed: int, now_ms: int) -> None:
        self.rng, self.now = random.Random(seed), now_ms
        self.cases: list[Case] = []
        self.sizes = [0] * PARTITIONS  # messages per partition so far
        self.devices = [Device(d, zlib.crc32(d.encode()) % PARTITIONS, now_ms - 3_600_000) for d in DEVICES]

    def add(self, case: Case) -> None:
        self.cases.append(case)
        self.sizes[case.partition] += 1

    def values(self, n: int = CHANNELS) -> list[float]:
        return [round(self.rng.gauss(0, 3), 4) for _ in range(n)]

    def valid(self, dev: Device, *, key: bytes | None | Literal["own"] = "own", kind: str = "valid",
              make: Callable[[int], bytes] | None = None, headers: Hdrs | None = None) -> None:
        """A reading that must be applied: the device's clock moves on."""
        dev.ts += self.rng.randint(200, 2000)
        value = make(dev.ts) if make is not None else _reading(dev.name, dev.ts, self.values())
        dev.applied.append((self.sizes[dev.partition], dev.ts, value))
        self.add(Case(dev.partition, dev.name.encode() if isinstance(key, str) else key, value, "prediction",
                      headers=headers, kind=kind))

    def bad(self, dev: Device, value: bytes | None, expect: str, detail: str, kind: str, *,
            key: bytes | None | Literal["own"] = "own", headers: Hdrs | None = None) -> None:
        """A message that must become a dead letter of class ``expect``, ``detail`` in its reason."""
        self.add(Case(dev.partition, dev.name.encode() if isinstance(key, str) else key, value, expect, detail,
                      headers, kind))

    def hostile(self, dev: Device) -> None:  # noqa: PLR0912, PLR0915 - one branch per kind, on purpose
        rng, name, ts, k = self.rng, dev.name, dev.ts + 1, self.rng.randrange(CHANNELS)
        vals = self.values()
        kind = rng.choice(KINDS)
        if kind == "tombstone":
            self.bad(dev, None, "empty", "payload is null", kind)
        elif kind == "tombstone_no_key":
            self.bad(dev, None, "empty", "payload is null", kind, key=None)
        elif kind == "empty_bytes":
            self.bad(dev, b"", "empty", "payload is empty", kind)
        elif kind == "null_key":  # require_key (the default): state is partitioned by key
            self.bad(dev, _reading(name, ts, vals), "key_mismatch", "message has no key", kind, key=None)
        elif kind == "wrong_key":
            other = rng.choice([d for d in DEVICES if d != name])
            self.bad(dev, _reading(name, ts, vals), "key_mismatch", "!= device_id", kind, key=other.encode())
        elif kind == "empty_key":  # b"" is a key, not a missing one
            self.bad(dev, _reading(name, ts, vals), "key_mismatch", "message key ''", kind, key=b"")
        elif kind == "binary_key":  # the reason shows it backslash-escaped: repr of '\\xff\x00\\xfe'
            self.bad(dev, _reading(name, ts, vals), "key_mismatch", r"message key '\\xff\x00\\xfe'", kind,
                     key=b"\xff\x00\xfe")
        elif kind == "key_other_normalisation":  # NFD of the id, or a zero-width space: bytes differ
            nfd = unicodedata.normalize("NFD", name)
            other_key = (nfd if nfd != name else name + "\u200b").encode()
            self.bad(dev, _reading(name, ts, vals), "key_mismatch", "!= device_id", kind, key=other_key)
        elif kind == "invalid_utf8":
            raw = _reading(name, ts, vals)
            cut = rng.randrange(1, len(raw) - 1)
            self.bad(dev, raw[:cut] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + raw[cut:],
                     "undecodable", "not UTF-8", kind)
        elif kind == "bom":
            self.bad(dev, b"\xef\xbb\xbf" + _reading(name, ts, vals), "malformed_json", "BOM", kind)
        elif kind == "truncated_json":
            raw = _reading(name, ts, vals)
            self.bad(dev, raw[: rng.randrange(1, len(raw) - 1)], "malformed_json", "invalid JSON", kind)
        elif kind == "deep_nesting":
            self.bad(dev, b"[" * 5000 + b"]" * 5000, "malformed_json", "invalid JSON", kind)
        elif kind == "array":
            self.bad(dev, b"[" + _reading(name, ts, vals) + b"]", "schema", "got array", kind)
        elif kind == "scalar":
            payload, what = rng.choice([(b"42", "integer"), (b'"pump-0"', "string"), (b"null", "null"),
                                        (b"true", "boolean"), (b"1.5e3", "number")])
            self.bad(dev, payload, "schema", f"got {what}", kind)
        elif kind == "nested":
            self.bad(dev, json.dumps({"reading": {"device_id": name, "ts": ts, "values": vals}}).encode(),
                     "schema", "device_id is missing", kind)
        elif kind == "duplicate_json_keys":  # the last one wins, in both parsers the codec uses
            quoted = json.dumps(name)
            self.valid(dev, kind=kind, make=lambda t: (f'{{"device_id": "impostor", "ts": 1, "device_id": {quoted}, '
                                                       f'"ts": {t}, "values": [1, 2, 3, 4]}}').encode())
        elif kind == "huge_number":
            raw = b'{"device_id": %s, "ts": %d, "values": [1, 1e400, 2, 3]}' % (json.dumps(name).encode(), ts)
            self.bad(dev, raw, "non_finite", "values[1] is Infinity", kind)
        elif kind == "nan_literal":
            raw = b'{"device_id": %s, "ts": %d, "values": [NaN, 1, 2, 3]}' % (json.dumps(name).encode(), ts)
            self.bad(dev, raw, "non_finite", "values[0] is NaN", kind)
        elif kind == "overflow_float32":
            bad_vals: list[Any] = [*vals[:k], 1e300, *vals[k + 1:]]
            self.bad(dev, _reading(name, ts, bad_vals), "non_finite", f"values[{k}] = 1e+300 overflows", kind)
        elif kind == "nan_string":
            bad_vals = [*vals[:k], "NaN", *vals[k + 1:]]
            self.bad(dev, _reading(name, ts, bad_vals), "schema", f"values[{k}] must be a number, got string",
                     kind)
        elif kind == "bool_value":
            bad_vals = [*vals[:k], rng.choice([True, False]), *vals[k + 1:]]
            self.bad(dev, _reading(name, ts, bad_vals), "schema", f"values[{k}] must be a number, got boolean",
                     kind)
        elif kind == "null_value":
            bad_vals = [*vals[:k], None, *vals[k + 1:]]
            self.bad(dev, _reading(name, ts, bad_vals), "schema", f"values[{k}] must be a number, got null",
                     kind)
        elif kind == "ts_int64_overflow":
            self.bad(dev, _reading(name, rng.choice([2**63 + 5, 2**64, 10**25]), vals), "bad_timestamp",
                     "ahead of now", kind)
        elif kind == "ts_negative":
            self.bad(dev, _reading(name, -rng.randint(1, 10**13), vals), "bad_timestamp", "before ts_min_ms",
                     kind)
        elif kind == "ts_float":
            self.bad(dev, _reading(name, ts + 0.5, vals), "schema", "ts must be an integer (epoch ms), got number",
                     kind)
        elif kind == "ts_string":
            self.bad(dev, _reading(name, str(ts), vals), "schema", "got string", kind)
        elif kind == "ts_seconds":
            self.bad(dev, _reading(name, ts // 1000, vals), "bad_timestamp", "before ts_min_ms", kind)
        elif kind == "ts_far_future":
            self.bad(dev, _reading(name, self.now + 3 * 86_400_000, vals), "bad_timestamp", "ahead of now", kind)
        elif kind == "extra_fields":
            extra = {"firmware": "1.2.3", "meta": {"a": [1, {"b": None}]}, "channels": ["t", "p", "q", "r"]}
            self.valid(dev, kind=kind, make=lambda t: _reading(name, t, vals, **extra))
        elif kind == "device_id_too_long":
            self.bad(dev, _reading("x" * 257, ts, vals), "schema", "longer than 256", kind, key=b"x" * 257)
        elif kind == "device_id_blank":
            bad_id, detail = rng.choice([("", "device_id is empty"), (" \t", "device_id is blank")])
            self.bad(dev, _reading(bad_id, ts, vals), "schema", detail, kind, key=None)
        elif kind == "device_id_surrogate":
            raw = b'{"device_id": "a\\ud800", "ts": %d, "values": [1, 2, 3, 4]}' % ts
            self.bad(dev, raw, "schema", "lone surrogate", kind, key=None)
        elif kind == "device_id_number":
            self.bad(dev, _reading(7, ts, vals), "schema", "device_id must be a string, got integer", kind,
                     key=None)
        elif kind == "at_size_limit":  # exactly max_payload_bytes: still a reading
            self.valid(dev, kind=kind, make=lambda t: _padded(_reading(name, t, vals, pad=""), MAX_PAYLOAD))
        elif kind == "over_size_limit":
            self.bad(dev, _padded(_reading(name, ts, vals, pad=""), MAX_PAYLOAD + 1), "oversize",
                     f"payload is {MAX_PAYLOAD + 1} bytes, limit {MAX_PAYLOAD}", kind)
        elif kind == "junk_headers_valid":
            self.valid(dev, kind=kind, headers=list(JUNK_HEADERS))
        elif kind == "junk_headers_invalid":
            self.bad(dev, b"\x00\x01garbage\xff", "undecodable", "not UTF-8", kind, headers=list(JUNK_HEADERS))
        elif kind == "wrong_length":
            n = rng.choice([1, 3, 5, 9])
            self.bad(dev, _reading(name, ts, self.values(n)), "wrong_length",
                     f"values has {n} entries, expected {CHANNELS}", kind)
        elif kind == "channels_mismatch":
            self.bad(dev, _reading(name, ts, vals, channels=["a", "b"]), "wrong_length", "channels has 2 names",
                     kind)
        elif kind == "adjacent_duplicate":  # a reading and its exact re-send: the second is a duplicate
            self.valid(dev, kind="duplicated")
            self.bad(dev, dev.applied[-1][2], "duplicate", f"already applied an event at ts {dev.ts}", kind)
        elif kind == "same_ts_other_values":
            self.valid(dev, kind="duplicated")
            self.bad(dev, _reading(name, dev.ts, self.values()), "duplicate", "already applied", kind)
        elif kind in ("late_resend", "late_out_of_order"):
            # Late only against readings applied in an earlier batch: those LATE_GAP offsets back or more.
            settled = [(t, raw) for pos, t, raw in dev.applied if pos <= self.sizes[dev.partition] - LATE_GAP]
            clock = max((t for t, _ in settled), default=None)
            old = [(t, raw) for t, raw in settled if clock is not None and t < clock]
            if not old:
                self.valid(dev)
                return
            old_ts, raw = rng.choice(old)
            if kind == "late_resend":  # an exact re-send of a reading applied long ago
                self.bad(dev, raw, "late", f"ts {old_ts} is older than device", kind)
            else:
                self.bad(dev, _reading(name, old_ts - 1, vals), "late", f"ts {old_ts - 1} is older than device",
                         kind)
        else:  # pragma: no cover - KINDS and the branches above are one list
            raise AssertionError(kind)

    def build(self) -> list[Case]:
        for _ in range(STEPS):
            dev = self.rng.choice(self.devices)
            if self.rng.random() < 0.75:
                self.valid(dev)
            else:
                self.hostile(dev)
        # Records the dead-letter producer cannot take whole (librdkafka: message.max.bytes, 1,000,000 by
        # default, key + value + headers): before the fix each one stopped the worker, at every restart.
        dev = self.devices[0]
        big = b'{"device_id": "pump-0", "pad": "' + b"z" * 2_500_000 + b'"}'  # lz4 makes it small on the wire
        self.bad(dev, big, "oversize", "payload is 2500034 bytes", "oversize_2_5_mb")
        blob = self.rng.randbytes(PRODUCER_LIMIT_VALUE)
        self.bad(dev, blob, "oversize", f"payload is {PRODUCER_LIMIT_VALUE} bytes", "oversize_at_producer_limit")
        self.bad(dev, _reading("pump-0", dev.ts + 1, self.values()), "key_mismatch", "!= device_id",
                 "key_1_2_mb", key=b"k" * 1_200_000)
        self.bad(dev, b'{"device_id": "pump-0"', "malformed_json", "invalid JSON", "header_1_2_mb",
                 headers=[("small", b"s"), ("big", b"h" * 1_200_000)])
        self.valid(dev, kind="after_the_big_ones")
        return self.cases


KINDS = ["tombstone", "tombstone_no_key", "empty_bytes", "null_key", "wrong_key", "empty_key", "binary_key",
         "key_other_normalisation", "invalid_utf8", "bom",
         "truncated_json", "deep_nesting", "array", "scalar", "nested", "duplicate_json_keys", "huge_number",
         "nan_literal", "overflow_float32", "nan_string", "bool_value", "null_value", "ts_int64_overflow",
         "ts_negative", "ts_float", "ts_string", "ts_seconds", "ts_far_future", "extra_fields",
         "device_id_too_long", "device_id_blank", "device_id_surrogate", "device_id_number", "at_size_limit",
         "over_size_limit", "junk_headers_valid", "junk_headers_invalid", "wrong_length", "channels_mismatch",
         "adjacent_duplicate", "same_ts_other_values", "late_resend", "late_out_of_order", "late_resend",
         "late_out_of_order"]


# ------------------------------------------------------------------------------------------- Kafka helpers
@dataclass(frozen=True)
class Out:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]

    @property
    def ls(self) -> dict[str, str]:
        return parse_dead_letter_headers(self.headers)


def produce(bootstrap: str, topic: str, cases: list[Case]) -> dict[Coord, Case]:
    """Produce in order (idempotent: no reordering within a partition); (partition, offset) -> case."""
    where: dict[Coord, Case] = {}
    failures: list[str] = []

    def report(err: KafkaError | None, msg: Any, *, case: Case) -> None:
        if err is not None:
            failures.append(f"{case.kind}: {err}")
        else:
            where[(msg.partition(), msg.offset())] = case

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20,
                         "compression.type": "lz4", "message.max.bytes": 4_000_000})
    for case in cases:
        kwargs: dict[str, Any] = {} if case.headers is None else {"headers": case.headers}
        producer.produce(topic, case.value, case.key, case.partition, on_delivery=functools.partial(report, case=case),
                         **kwargs)
        producer.poll(0)
    assert producer.flush(60) == 0 and not failures, failures[:5]
    return where


def read_all(bootstrap: str, topic: str) -> list[Out]:
    """Every committed record of ``topic`` (``read_committed``), raw headers kept."""
    return drain_messages(bootstrap, topic, lambda m: Out(m.partition() or 0, m.offset() or 0, m.key(), m.value(),
                                                          cast("Hdrs", m.headers() or [])))


def run_worker(bootstrap: str, topics: Topics, tmp: Path, processes: list[subprocess.Popen[str]],
               guarantee: str) -> tuple[int, dict[str, Any], str]:
    log = tmp / f"worker-{guarantee}.log"
    group = f"hostile-{uuid.uuid4().hex[:10]}"
    cmd = cli("run", "--bootstrap", bootstrap, "--input-topic", topics.input, "--predictions-topic",
              topics.predictions, "--alerts-topic", topics.alerts, "--dlq-topic", topics.dlq, "--group-id", group,
              "--channels", str(CHANNELS), "--device", "cpu", "--exit-when-idle", "3", "--batch-max-messages",
              str(BATCH), "--guarantee", guarantee)
    proc = spawn(cmd, log, processes, {"LIQUIDSTREAM_TORCH_THREADS": "1"})
    rc, stats = finish(proc, log)
    return rc, stats, log.read_text()


def check_dead_letter(dl: Out, case: Case, topic: str) -> None:
    """Class and detail as expected; key, value and headers those of the input, or cut as ``ls.truncated`` says."""
    ls = dl.ls
    assert ls[HEADER_TOPIC] == topic
    assert ls[HEADER_CLASS] == case.expect, (case.kind, ls[HEADER_REASON], case.value and case.value[:120])
    assert case.detail in ls[HEADER_REASON], (case.kind, ls[HEADER_REASON], case.detail)
    cut = json.loads(ls[HEADER_TRUNCATED]) if HEADER_TRUNCATED in ls else {}
    for part, got, want in (("key", dl.key, case.key), ("value", dl.value, case.value)):
        if f"{part}_bytes" in cut:
            assert want is not None and got is not None
            assert (cut[f"{part}_bytes"], cut[f"{part}_sha256"]) == (len(want), hashlib.sha256(want).hexdigest())
            assert got == want[: cut[f"{part}_kept"]] and len(got) == cut[f"{part}_kept"] < len(want), case.kind
        else:
            assert got == want, (case.kind, part, (got or b"")[:80], (want or b"")[:80])
    forwarded = [(n, v) for n, v in dl.headers if not n.startswith(HEADER_PREFIX)]
    if "headers_dropped" in cut:
        assert forwarded == [] and cut["headers_dropped"] == len(case.headers or ()), case.kind
    else:
        assert forwarded == [(n, v) for n, v in case.headers or () if not n.startswith(HEADER_PREFIX)], case.kind
    if case.kind in ("oversize_2_5_mb", "oversize_at_producer_limit", "key_1_2_mb", "header_1_2_mb"):
        assert cut, f"{case.kind}: {len(case.value or b'')} bytes on the DLQ uncut?"
        size = len(dl.key or b"") + len(dl.value or b"") + sum(len(n) + len(v or b"") for n, v in dl.headers)
        assert size <= MAX_DEAD_LETTER_BYTES + 2048
    assert HEADER_UNREADABLE not in ls


# ------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_hostile_stream_every_offset_comes_out_once_with_its_reason(
        kafka_bootstrap: str, topics: Topics, tmp_path: Path, processes: list[subprocess.Popen[str]],
        guarantee: str) -> None:
    t0 = time.monotonic()
    cases = Generator(SEED, time.time_ns() // 1_000_000).build()
    kinds = Counter(c.kind for c in cases)
    assert set(KINDS) <= set(kinds), set(KINDS) - set(kinds)  # the seed reaches every kind
    inputs = produce(kafka_bootstrap, topics.input, cases)
    assert len(inputs) == len(cases)

    rc, stats, log = run_worker(kafka_bootstrap, topics, tmp_path, processes, guarantee)
    assert rc == 0, log[-4000:]
    assert stats["balanced"] and stats["consumed"] == len(cases), stats
    expected = Counter(c.expect for c in cases)
    assert stats["predictions"] == expected["prediction"], (stats, expected)
    assert stats["dead_letters_by_reason"] == {r: n for r, n in expected.items() if r != "prediction"}

    preds, dlq = read_all(kafka_bootstrap, topics.predictions), read_all(kafka_bootstrap, topics.dlq)
    seen: Counter[Coord] = Counter()
    for p in preds:
        rec = json.loads(p.value or b"")
        coord = (rec["source"]["partition"], rec["source"]["offset"])
        seen[coord] += 1
        case = inputs[coord]
        src = json.loads(case.value or b"")
        assert rec["source"]["topic"] == topics.input and case.expect == "prediction", (case.kind, rec)
        assert (rec["device_id"], rec["ts"], p.key) == (src["device_id"], src["ts"], src["device_id"].encode())
        assert len(rec["forecast"]) == CHANNELS
    for dl in dlq:
        coord = (int(dl.ls[HEADER_PARTITION]), int(dl.ls[HEADER_OFFSET]))
        seen[coord] += 1
        check_dead_letter(dl, inputs[coord], topics.input)
    assert set(seen) == set(inputs), f"no output for {sorted(set(inputs) - set(seen))[:10]}"
    assert max(seen.values()) == 1, f"more than one output: {[c for c, n in seen.items() if n > 1][:10]}"
    print(f"\n{guarantee}: {len(cases)} messages ({expected['prediction']} valid, {len(kinds)} kinds), "
          f"dead letters {dict(sorted(stats['dead_letters_by_reason'].items()))}; test {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------------------------------- header names
#: Produces records whose first header *name* is not UTF-8 (the Kafka protocol does not stop it; C and Go clients
#: can send it, confluent-kafka cannot): aiokafka's pure-Python record builder (a process of its own, as the
#: choice is made at import) with a str whose encode() returns raw bytes.  argv: bootstrap, topic, JSON
#: [[partition, key, value], ...] (latin-1 text).
RAW_HEADER_PRODUCER = """
import asyncio, json, sys
from aiokafka import AIOKafkaProducer

class RawName(str):
    def encode(self, encoding="utf-8", errors="strict"):
        return b"name-\\xff\\xfe"

async def send():
    producer = AIOKafkaProducer(bootstrap_servers=sys.argv[1])
    await producer.start()
    try:
        for partition, key, value in json.loads(sys.argv[3]):
            await producer.send_and_wait(sys.argv[2], value.encode("latin-1"), key=key.encode("latin-1"),
                                         partition=partition, headers=[(RawName("x"), b"v"), ("fine", b"\\x00")])
    finally:
        await producer.stop()

asyncio.run(send())
"""


def _headers_unreadable(bootstrap: str, topic: str) -> bool:
    """Whether confluent-kafka fails to read the headers of the first record of ``topic``[0]."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:12]}"})
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is not None and m.error() is None:
                try:
                    m.headers()
                except (SystemError, UnicodeDecodeError):
                    return True
                return False
        return False
    finally:
        consumer.close()


def test_header_name_that_is_not_utf8_is_dead_lettered_not_a_crash(
        kafka_bootstrap: str, topics: Topics, tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    valid = _reading("pump-0", time.time_ns() // 1_000_000 - 1000, [1, 2, 3, 4]).decode("latin-1")
    records = json.dumps([[0, "pump-0", valid], [0, "pump-0", "garbage"]])
    made = subprocess.run([sys.executable, "-c", RAW_HEADER_PRODUCER, kafka_bootstrap, topics.input, records],
                          env=os.environ | {"AIOKAFKA_NO_EXTENSIONS": "1"}, capture_output=True, text=True, timeout=60,
                          check=False)
    if made.returncode != 0 or not _headers_unreadable(kafka_bootstrap, topics.input):  # setup, not the worker
        pytest.fail(f"could not produce a record with a non-UTF-8 header name: {made.stderr[-2000:]}")
    rc, stats, log = run_worker(kafka_bootstrap, topics, tmp_path, processes, "at_least_once")
    assert rc == 0, log[-3000:]
    assert (stats["consumed"], stats["predictions"], stats["dead_letters"]) == (2, 1, 1)
    (dl,) = read_all(kafka_bootstrap, topics.dlq)
    assert (dl.key, dl.value, dl.ls[HEADER_CLASS]) == (b"pump-0", b"garbage", "malformed_json")
    assert (int(dl.ls[HEADER_PARTITION]), int(dl.ls[HEADER_OFFSET])) == (0, 1)
    assert "not UTF-8" in dl.ls[HEADER_UNREADABLE] or "decode" in dl.ls[HEADER_UNREADABLE]
