"""Bytes per device held by the DeviceStateStore, measured (not computed from shapes).

Usage: ``.venv/bin/python benchmarks/state_memory.py [--devices 100000] [--hidden 64] [--channels 8]``

Creates the devices through the public API (``rows_for``), then measures (a) the tensor and numpy bytes of
the store and (b) the heap growth (the device-id index arrays, the free-row list) with ``tracemalloc``.  Prints one JSON
line with ``bytes_per_device`` (everything, at the store's current capacity), ``raw_bytes_per_device``
(the per-row field sizes) and the capacity overhead of geometric growth (factor 1.125).
"""

from __future__ import annotations

import argparse
import json
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liquidstream.operators.state.store import DeviceStateStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()
    ids = [f"device-{i:07d}" for i in range(args.devices)]  # built before measuring: ids belong to the caller
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = DeviceStateStore(args.hidden, args.channels, initial_capacity=1024)
    for lo in range(0, len(ids), 10_000):
        store.rows_for(ids[lo:lo + 10_000])
    python_heap = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    arrays = store.nbytes()
    # torch tensors are allocated outside tracemalloc's view; numpy host arrays are inside it, so count
    # the heap growth minus the numpy part to avoid counting those twice.
    host_arrays = sum(a.nbytes for a in store.host.values())
    index_bytes = max(python_heap - host_arrays, 0)
    raw_row = arrays / store.capacity
    print(json.dumps({
        "devices": len(store), "capacity": store.capacity, "hidden_size": args.hidden, "channels": args.channels,
        "raw_bytes_per_device": round(raw_row, 1),
        "array_bytes_per_device": round(arrays / len(store), 1),
        "index_bytes_per_device": round(index_bytes / len(store), 1),
        "bytes_per_device": round((arrays + index_bytes) / len(store), 1),
    }))


if __name__ == "__main__":
    main()
