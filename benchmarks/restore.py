"""How long restoring many devices from the state changelog takes, through a real broker.

Usage: ``.venv/bin/python benchmarks/restore.py --bootstrap 127.0.0.1:9092 [--devices 100000] [--partitions 4]
[--hidden 32] [--channels 4]`` (a broker: ``deploy/kafka-local/kafka-local start``).

Writes one changelog record per device (``store.snapshot([id])`` bytes, pinned to its partition, plus the progress
records), exactly as the worker does, into a fresh compacted topic; then times what a worker does on assignment of all
partitions: read the changelog from the beginning to its end with a ``read_committed`` consumer
(:func:`liquidstream.pipeline.kafka.changelog.read_changelog`), merge the per-device values into one snapshot, and
restore it into an empty store.  Prints one JSON line; the restored state is checked bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from confluent_kafka import Producer  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings  # noqa: E402
from liquidstream.operators.state.store import DeviceStateStore  # noqa: E402
from liquidstream.pipeline.kafka.changelog import (  # noqa: E402
    StateLayout,
    changelog_records,
    ensure_topic,
    read_changelog,
    restore_consumer,
)
from liquidstream.pipeline.kafka.transactions import (  # noqa: E402
    DeliveryTracker,
    flush_checked,
    produce_all,
    producer_config,
)
from liquidstream.pipeline.settings import Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = uuid.uuid4().hex[:8]
    settings = Settings(bootstrap=args.bootstrap, input_topic=f"bench-in-{run}", group_id=f"bench-{run}")
    admin = AdminClient(settings.kafka_client_config())
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    admin.create_topics([NewTopic(settings.input_topic, args.partitions, 1)])[settings.input_topic].result(30)
    time.sleep(1.0)
    ensure_topic(admin, settings)

    # Devices with real, distinct state: two readings each through the operator.
    op = LiquidOperator(Forecaster(n_channels=args.channels, hidden_size=args.hidden), OperatorSettings())
    ids = [f"device-{i:07d}" for i in range(args.devices)]
    rng = np.random.default_rng(0)
    for step in range(2):
        op.process(ids, np.full(len(ids), 1_767_225_600_000 + 1000 * step, dtype=np.int64),
                   rng.normal(size=(len(ids), args.channels)).astype(np.float32))
    where = {d: (settings.input_topic, i % args.partitions) for i, d in enumerate(ids)}
    offsets = {(settings.input_topic, p): args.devices for p in range(args.partitions)}
    t0 = time.perf_counter()
    records = changelog_records(StateLayout(op.store), op.store, where, offsets, settings.changelog, "bench")
    encode_s = time.perf_counter() - t0
    producer, tracker = Producer(producer_config(settings)), DeliveryTracker()
    produce_all(producer, records, tracker)
    flush_checked(producer, tracker, timeout_s=300)
    mb = sum(len(r.value or b"") + len(r.key or b"") for r in records) / 1e6

    consumer = restore_consumer(settings)
    t0 = time.perf_counter()
    got = read_changelog(consumer, settings.changelog, dict.fromkeys(range(args.partitions), args.devices), 300)
    read_s = time.perf_counter() - t0
    store = DeviceStateStore(args.hidden, args.channels)
    layout = StateLayout(store)
    t1 = time.perf_counter()
    merged = layout.merge(got.blobs)
    merge_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    store.restore(merged)
    restore_s = time.perf_counter() - t2
    total_s = time.perf_counter() - t0
    consumer.close()
    assert len(store) == args.devices
    assert store.snapshot(ids) == op.store.snapshot(ids), "restored state differs"
    admin.delete_topics([settings.input_topic, settings.changelog])
    print(json.dumps({"devices": args.devices, "partitions": args.partitions, "hidden": args.hidden,
                      "channels": args.channels, "changelog_records": got.records, "changelog_mb": round(mb, 1),
                      "encode_s": round(encode_s, 3), "read_s": round(read_s, 3), "merge_s": round(merge_s, 3),
                      "store_restore_s": round(restore_s, 3), "restore_total_s": round(total_s, 3),
                      "devices_per_s": round(args.devices / total_s)}))


if __name__ == "__main__":
    main()
