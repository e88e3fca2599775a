"""The worker's per-batch Python work without Kafka: decode, operator, records, changelog records.

Usage: ``.venv/bin/python benchmarks/worker_step.py [--events 30000] [--devices 2000] [--batch 5000]
[--repeats 3] [--eos] [--profile] [--no-gc-tune]``

Times :func:`liquidstream.pipeline.kafka.batch_step.handle_batch` plus
:func:`liquidstream.pipeline.kafka.changelog.changelog_records` (and, with
``--eos``, the pre-batch state snapshot the exactly-once worker takes) over in-memory messages shaped like
consumed ones (JSON readings, 8 channels, H = 64).  This is the CPU the worker spends per event outside the
Kafka client and the broker: the ceiling of the end-to-end figures of ``benchmarks/e2e_kafka.py``.
``--profile`` prints the top functions (cProfile) instead.  Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings  # noqa: E402
from liquidstream.pipeline import changelog as cl  # noqa: E402
from liquidstream.pipeline.kafka.batch_step import handle_batch, tune_gc
from liquidstream.pipeline.kafka.bookkeeping import StateUndo
from liquidstream.pipeline.kafka.output import OutputTopics
from liquidstream.pipeline.wire.codec import DecodeLimits  # noqa: E402


class Message:
    """A consumed message as :func:`handle_batch` reads it."""

    __slots__ = ("_key", "_offset", "_value")

    def __init__(self, key: bytes, value: bytes, offset: int) -> None:
        self._key, self._value, self._offset = key, value, offset

    def topic(self) -> str:
        return "readings"

    def partition(self) -> int:
        return self._offset % 4

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None


def messages(events: int, devices: int, channels: int, now_ms: int) -> list[Message]:
    rng = np.random.default_rng(1)
    dev = rng.integers(0, devices, size=events)
    ts = now_ms - np.sort(rng.uniform(0, 3_600_000, size=events)).astype(np.int64)[::-1]
    vals = np.round(rng.normal(size=(events, channels)), 4).tolist()
    out = []
    for i, (d, t, v) in enumerate(zip(dev.tolist(), ts.tolist(), vals, strict=True)):
        key = f"device-{d:06d}"
        out.append(Message(key.encode(), json.dumps({"device_id": key, "ts": t, "values": v}).encode(), i))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=30_000)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eos", action="store_true", help="also the exactly-once worker's pre-batch snapshot")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-gc-tune", action="store_true", help="skip the worker's tune_gc() (gc.freeze)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    now = time.time_ns() // 1_000_000
    msgs = messages(args.events, args.devices, args.channels, now)
    limits = DecodeLimits(n_channels=args.channels, max_payload_bytes=65536, ts_min_ms=0, max_future_ms=86_400_000)
    topics = OutputTopics("predictions", "alerts", "dlq")
    rates = []
    if not args.no_gc_tune:
        tune_gc()  # as KafkaWorker.run does before its loop
    for _ in range(args.repeats):
        op = LiquidOperator(Forecaster(args.channels, 64, "cfc"), OperatorSettings())
        layout = cl.StateLayout(op.store)

        def step(batch: list[Message], op: LiquidOperator = op, layout: cl.StateLayout = layout) -> None:
            undo = StateUndo(op.store)
            out = handle_batch(batch, op, topics, limits, now, "bench",
                               before_process=undo.take if args.eos else None)
            cl.changelog_records(layout, op.store, out.device_partitions, out.commits, "changelog", op.model_version)

        step(msgs[:args.batch])  # first readings of most devices, outside the timing
        profiler = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        for lo in range(args.batch, len(msgs), args.batch):
            step(msgs[lo:lo + args.batch])
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        rates.append((len(msgs) - args.batch) / (time.perf_counter() - start))
    print(json.dumps({"events_per_s": round(statistics.median(rates), 1), "runs": [round(r) for r in rates],
                      "eos_snapshot": args.eos, "gc_tuned": not args.no_gc_tune, "devices": args.devices,
                      "batch": args.batch,
                      "events": len(msgs) - args.batch}))


if __name__ == "__main__":
    main()
