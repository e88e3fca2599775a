"""``liquidstream simulate``: a simulated fleet's readings onto a Kafka topic, with optional injected faults.

Readings come from :func:`liquidstream.pipeline.offline.simulator.simulate` (the demo's generator), keyed by device id,
in stream order.  Faults make the worker's dead-letter paths observable: ``malformed`` messages of every kind the codec
rejects (:data:`MALFORMED_KINDS` maps each kind to the ``ls.error.class`` it must get), exact ``duplicate`` re-sends
right after the original, and ``late`` readings (a device's first reading moved 1 s earlier, sent near the end of the
stream).  Each injected message carries the header ``sim.fault = <kind>``, which the dead-letter topic forwards, so
tests and demos can tell injected faults from real ones.

Event times are epoch milliseconds; by default the simulated span ends at the wall clock, so the readings
look live to the worker's timestamp checks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from liquidstream.operators.errors import ConfigError
from liquidstream.pipeline.offline.simulator import Incident, SimulatedStream, simulate
from liquidstream.pipeline.wire.schemas import DeadLetterReason

log = logging.getLogger("liquidstream.simulate")

FAULT_HEADER = "sim.fault"
R = DeadLetterReason
#: Malformed-message kinds and the dead-letter class the worker must give each.
MALFORMED_KINDS: dict[str, DeadLetterReason] = {
    "not_json": R.MALFORMED_JSON, "truncated_json": R.MALFORMED_JSON, "not_an_object": R.SCHEMA,
    "missing_field": R.SCHEMA, "wrong_type": R.SCHEMA, "nan_literal": R.NON_FINITE,
    "infinity_literal": R.NON_FINITE, "float32_overflow": R.NON_FINITE, "wrong_length": R.WRONG_LENGTH,
    "absurd_timestamp": R.BAD_TIMESTAMP, "oversize": R.OVERSIZE, "invalid_utf8": R.UNDECODABLE,
    "empty": R.EMPTY, "null": R.EMPTY, "key_mismatch": R.KEY_MISMATCH,
}
#: Every injected fault kind and its dead-letter class (``late``/``duplicate`` come from the operator).
FAULT_REASONS: dict[str, DeadLetterReason] = MALFORMED_KINDS | {"duplicate": R.DUPLICATE, "late": R.LATE}


@dataclass(frozen=True)
class SimMessage:
    """One record for the input topic; ``fault`` is None for a genuine reading."""

    key: bytes | None
    value: bytes | None
    fault: str | None = None

    def headers(self) -> list[tuple[str, str | bytes | None]] | None:
        return None if self.fault is None else [(FAULT_HEADER, self.fault.encode("ascii"))]


def _js(obj: object) -> bytes:
    # allow_nan (the default) on purpose: the malformed kinds need NaN/Infinity literals
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _malformed(kind: str, dev: str, other: str, ts: int, c: int, limit: int,
               rng: np.random.Generator) -> tuple[bytes | None, bytes | None]:
    """(key, value) of one malformed message of ``kind`` for device ``dev`` (``other``: a second device)."""
    values: list[Any] = np.round(rng.normal(0.0, 10.0, c), 3).tolist()
    good: dict[str, Any] = {"device_id": dev, "ts": ts, "values": values}
    pick = int(rng.integers(5))
    key = dev.encode("utf-8")
    value: bytes | None = _js(good)
    if kind == "not_json":
        value = f"device={dev};ts={ts};values={values}".encode()
    elif kind == "truncated_json":
        value = _js(good)[: len(_js(good)) // 2]
    elif kind == "not_an_object":
        value = _js([dev, ts, values])
    elif kind == "missing_field":
        value = _js({k: v for k, v in good.items() if k != ("device_id", "ts", "values")[pick % 3]})
    elif kind == "wrong_type":
        wrong: list[dict[str, Any]] = [{"ts": str(ts)}, {"values": ",".join(map(str, values))},
                                       {"device_id": 42}, {"values": [True, *values[1:]]}, {"ts": ts + 0.5}]
        value = _js(good | wrong[pick])
    elif kind == "nan_literal":
        value = _js(good | {"values": [math.nan, *values[1:]]})
    elif kind == "infinity_literal":
        value = _js(good | {"values": [*values[:-1], math.inf if pick % 2 else -math.inf]})
    elif kind == "float32_overflow":
        value = _js(good | {"values": [1e39, *values[1:]]})
    elif kind == "wrong_length":
        value = _js(good | {"values": values[:-1] if c > 1 and pick % 2 else [*values, 0.0]})
    elif kind == "absurd_timestamp":  # negative or years ahead: out of range under any sane limits
        year_ms = 365 * 86_400_000
        value = _js(good | {"ts": [-5, -(2**40), ts + 10 * year_ms, ts + 100 * year_ms, 2**62][pick]})
    elif kind == "oversize":  # otherwise a valid reading: the size check must come first
        value = _js(good | {"pad": "x" * limit})
    elif kind == "invalid_utf8":
        value = b"\xff\xfe" + rng.bytes(int(rng.integers(1, 64)))  # 0xff never occurs in UTF-8
    elif kind == "empty":
        value = b""
    elif kind == "null":
        value = None
    elif kind == "key_mismatch":
        key = other.encode("utf-8")
    else:
        msg = f"unknown malformed kind {kind!r}"
        raise ConfigError(msg)
    return key, value


def malformed_messages(count: int, device_ids: list[str], *, n_channels: int, now_ms: int,
                       max_payload_bytes: int = 64 * 1024, seed: int = 0) -> list[SimMessage]:
    """``count`` malformed messages cycling through every kind (so ``count >= 15`` covers them all), keyed by
    random devices of ``device_ids``; timestamps near ``now_ms`` (epoch ms) unless the kind is about them."""
    rng = np.random.default_rng([seed, 0x6D616C])
    kinds = list(MALFORMED_KINDS)
    out = []
    for i in range(count):
        dev, other = (str(d) for d in rng.choice(device_ids, 2, replace=len(device_ids) < 2))
        if other == dev:
            other = dev + "-other"
        key, value = _malformed(kinds[i % len(kinds)], dev, other, now_ms, n_channels, max_payload_bytes, rng)
        out.append(SimMessage(key, value, kinds[i % len(kinds)]))
    return [out[i] for i in rng.permutation(count)]


def fleet_stream(devices: int, events: int, *, channels: int = 4, seed: int = 0, anomaly_rate: float = 3.0,
                 mean_gap_s: float = 1.0, end_ms: int | None = None) -> SimulatedStream:
    """About ``events`` readings of ``devices`` devices, cut to exactly ``events`` in stream order.

    The duration is chosen so that each device sends ``events / devices`` readings on average; the first
    quarter of it (at most 600 s) is incident-free so that device statistics settle.  The span ends at
    ``end_ms`` (epoch ms, default: now).  Incidents cut by the end are clipped to the last kept reading.
    """
    if devices < 1 or events < 1:
        msg = f"devices and events must be >= 1, got {devices} and {events}"
        raise ConfigError(msg)
    end_ms = time.time_ns() // 1_000_000 if end_ms is None else end_ms
    duration_s = events / devices * mean_gap_s
    for _ in range(8):
        sim = simulate(n_devices=devices, duration_s=duration_s, channels=channels, seed=seed,
                       anomaly_rate=anomaly_rate, start_ms=end_ms - math.ceil(duration_s * 1000),
                       mean_gap_s=mean_gap_s, normal_prefix_s=min(600.0, 0.25 * duration_s))
        if len(sim.ts_ms) >= events:
            return _cut(sim, events)
        duration_s *= 1.1 * events / max(len(sim.ts_ms), 1)
    msg = f"could not simulate {events} events for {devices} devices"
    raise ConfigError(msg)


def _cut(sim: SimulatedStream, n: int) -> SimulatedStream:
    ids, ts = sim.device_ids[:n], sim.ts_ms[:n]
    last: dict[str, int] = {}
    for dev, t in zip(ids.tolist(), ts.tolist(), strict=True):
        last[dev] = t
    kept = tuple(Incident(i.device_id, i.kind, i.start_ms, min(i.end_ms, last[i.device_id]), i.channels)
                 for i in sim.incidents if i.start_ms <= last.get(i.device_id, -1))
    return SimulatedStream(ids, ts, sim.values[:n], kept)


def build_messages(stream: SimulatedStream, *, malformed: int = 0, duplicates: int = 0, late: int = 0,
                   now_ms: int, max_payload_bytes: int = 64 * 1024, seed: int = 0) -> list[SimMessage]:
    """The readings of ``stream`` as keyed JSON messages, with the injected faults mixed in."""
    readings = [SimMessage(r["device_id"].encode("utf-8"), _js(r)) for r in stream.records()]
    n = len(readings)
    if n == 0 or duplicates > n:
        msg = f"cannot inject {duplicates} duplicates into {n} readings"
        raise ConfigError(msg)
    rng = np.random.default_rng([seed, 0x696E6A])
    after: dict[int, list[SimMessage]] = {}
    for i in rng.choice(n, duplicates, replace=False).tolist():  # the device's very next message
        after.setdefault(i, []).append(SimMessage(readings[i].key, readings[i].value, "duplicate"))
    first: dict[str, int] = {}
    for i, dev in enumerate(stream.device_ids.tolist()):
        first.setdefault(dev, i)
    firsts = list(first.values())
    # A device's first reading moved 1 s earlier, sent in the last tenth of the stream; distinct devices
    # where possible, since two such copies of one reading would make the second a duplicate.
    for d in rng.choice(len(firsts), late, replace=late > len(firsts)).tolist():
        j = firsts[d]
        rec = {"device_id": str(stream.device_ids[j]), "ts": int(stream.ts_ms[j]) - 1000,
               "values": stream.values[j].tolist()}
        after.setdefault(int(rng.integers(n - max(1, n // 10), n)), []).append(
            SimMessage(readings[j].key, _js(rec), "late"))
    ids = sorted(first)
    for m in malformed_messages(malformed, ids, n_channels=stream.values.shape[1], now_ms=now_ms,
                                max_payload_bytes=max_payload_bytes, seed=seed):
        after.setdefault(int(rng.integers(n)), []).append(m)
    out: list[SimMessage] = []
    for i, reading in enumerate(readings):
        out.append(reading)
        out.extend(after.get(i, ()))
    return out


def produce_messages(producer: Any, topic: str, messages: list[SimMessage], *, rate: float = 0.0,
                     on_delivery: Callable[[Any, Any], None] | None = None) -> float:
    """Produce in order at ``rate`` messages/s (0: as fast as possible); returns the seconds it took.

    Does not flush: the caller flushes and checks the delivery reports."""
    start = time.monotonic()
    last_log = start
    for i, m in enumerate(messages):
        while True:
            try:
                producer.produce(topic, m.value, m.key, headers=m.headers(), on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.05)
        if rate > 0:
            ahead = start + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        if i % 1000 == 999:
            producer.poll(0)
            if time.monotonic() - last_log >= 5.0:
                last_log = time.monotonic()
                log.info("produced %d/%d messages to %s", i + 1, len(messages), topic)
    return time.monotonic() - start
