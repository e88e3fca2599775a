"""Throughput at every fleet shape: the same readings spread over 1 to 100,000 devices, before and after.

Usage: ``.venv/bin/python benchmarks/fleet_shapes.py [--quick] [--shapes 1,10,200,10000,100000]
[--readings N] [--repeats R] [--skip-replay] [--nab ../shared/data/nab] [--crossover]``

For each fleet shape the same number of readings (``--readings``; 300,000, quick 200,000) is spread evenly over
the devices, with irregular gaps (0.1-5 s) and 8 channels, interleaved by event time, and fed to
``LiquidOperator.process`` (hidden 64, the default CfC model) in batches of the worker's ``batch_max_messages``
(10,000), with the worker's torch thread default (half the cores).  Three figures per shape, in the same run:

* **after**: ``step_path="auto"`` (the operator picks the compiled per-device step or the tensor waves per batch);
* **before**: ``step_path="tensor"`` (every batch as waves of tensor operations, as before the compiled step);
  timed on the first ``2,000 x devices`` readings when that is fewer (one device's waves cost milliseconds each);
* **per-event loop**: the seed-style loop of ``benchmarks/operator_throughput.py`` on the first 2,000 readings.

Rates are readings per wall-clock second, medians over ``--repeats`` fresh operators (before and after
alternate); the compiled kernel is loaded (or compiled) once before timing.  Then, unless ``--skip-replay``,
``liquidstream replay`` end to end (start-up, reading the JSONL file, writing predictions.jsonl) on a file of one
device and one of 10,000 devices (``--replay-readings`` each), and with ``--nab`` on NAB's 58 files, each file's
readings one after another.  ``--crossover`` instead times both paths (per CPU second) on batches of 10,000
readings at 1-16 readings per device: the measurement behind ``COMPILED_MIN_READINGS_PER_DEVICE``.  Last line:
one JSON object (``devices_1`` ... ``devices_100000`` and ``per_event_loop``, readings/s).  Prints figures,
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from operator_throughput import make_events, measure_memory, run_per_event  # noqa: E402

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings  # noqa: E402
from liquidstream.pipeline.settings import Settings  # noqa: E402

BEFORE_PER_DEVICE = 2_000  # readings per device timed on the tensor path (all of them when fewer)


def run(model: Forecaster, path: str, ids: list[str], ts: np.ndarray, vals: np.ndarray,
        batch: int) -> tuple[float, float, dict[str, int]]:
    """Readings per wall-clock second and per CPU second (this process, all threads: steadier on a shared box) of
    a fresh operator over the stream, and how many batches each path took."""
    op = LiquidOperator(model, OperatorSettings(step_path=path))  # type: ignore[arg-type]
    paths: dict[str, int] = {}
    start, cpu = time.perf_counter(), time.process_time()
    for lo in range(0, len(ids), batch):
        op.process(ids[lo:lo + batch], ts[lo:lo + batch], vals[lo:lo + batch])
        paths[op.last_step_path] = paths.get(op.last_step_path, 0) + 1
    return len(ids) / (time.perf_counter() - start), len(ids) / (time.process_time() - cpu), paths


def shapes(model: Forecaster, counts: list[int], readings: int, batch: int, repeats: int,
           loop_events: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    print(f"{'devices':>8} {'readings':>9} {'before r/s':>11} {'after r/s':>11} {'x before':>8} {'path':>14} "
          f"{'loop r/s':>9} {'x loop':>7}", flush=True)
    for devices in counts:
        ids, ts, vals = make_events(devices, max(1, readings // devices), 8, seed=1)
        n_before = min(len(ids), BEFORE_PER_DEVICE * devices)
        before_batch = min(batch, n_before)
        run(model, "auto", ids[:batch], ts[:batch], vals[:batch], batch)  # warm: kernel load, allocator
        after, before, loop, after_cpu, before_cpu = [], [], [], [], []
        paths: dict[str, int] = {}
        for _ in range(repeats):
            rate, cpu_rate, paths = run(model, "auto", ids, ts, vals, batch)
            after.append(rate)
            after_cpu.append(cpu_rate)
            rate, cpu_rate, _ = run(model, "tensor", ids[:n_before], ts[:n_before], vals[:n_before], before_batch)
            before.append(rate)
            before_cpu.append(cpu_rate)
            loop.append(run_per_event(model, ids[:loop_events], ts[:loop_events], vals[:loop_events], "cpu"))
        a, b, lp = statistics.median(after), statistics.median(before), statistics.median(loop)
        used = "+".join(f"{k} {v}" for k, v in sorted(paths.items()))
        print(f"{devices:>8} {len(ids):>9} {b:>11,.0f} {a:>11,.0f} {a / b:>8.1f} {used:>14} {lp:>9,.0f} "
              f"{a / lp:>7.1f}   (per CPU-s: before {statistics.median(before_cpu):,.0f}, after "
              f"{statistics.median(after_cpu):,.0f})", flush=True)
        out[f"devices_{devices}"] = round(a)
        out[f"before_devices_{devices}"] = round(b)
        out[f"cpu_devices_{devices}"] = round(statistics.median(after_cpu))
        out[f"cpu_before_devices_{devices}"] = round(statistics.median(before_cpu))
        out[f"before_readings_{devices}"] = n_before
        out[f"loop_devices_{devices}"] = round(lp)
        out[f"paths_{devices}"] = paths
        out[f"runs_{devices}"] = [round(r) for r in after]
    loops = [v for k, v in out.items() if k.startswith("loop_devices_")]
    out["per_event_loop"] = round(statistics.median(loops))
    out["min_x_loop"] = round(min(out[f"devices_{d}"] / out[f"loop_devices_{d}"] for d in counts), 1)
    return out


def crossover(model: Forecaster, batch: int, repeats: int) -> dict[str, Any]:
    """Both paths on batches of ``batch`` readings at r readings per device (batch / r devices)."""
    out: dict[str, Any] = {}
    print(f"{'r/device':>8} {'devices':>8} {'tensor r/CPU-s':>15} {'compiled r/CPU-s':>17}", flush=True)
    for per in (1, 2, 3, 4, 6, 8, 16):
        devices = batch // per
        ids, ts, vals = make_events(devices, 3 * per, 8, seed=2)  # three batches, each r readings per device
        rates = {}
        for path in ("tensor", "compiled"):
            run(model, path, ids[:batch], ts[:batch], vals[:batch], batch)
            rates[path] = statistics.median(run(model, path, ids, ts, vals, batch)[1] for _ in range(repeats))
        print(f"{per:>8} {devices:>8} {rates['tensor']:>15,.0f} {rates['compiled']:>17,.0f}", flush=True)
        out[f"crossover_{per}"] = {k: round(v) for k, v in rates.items()}
    return out


def write_jsonl(path: Path, ids: list[str], ts: np.ndarray, vals: np.ndarray) -> None:
    with path.open("w") as f:
        for d, t, v in zip(ids, ts.tolist(), vals.tolist(), strict=True):
            f.write(json.dumps({"device_id": d, "ts": t, "values": v}) + "\n")


def nab_jsonl(data_dir: Path, path: Path) -> int:
    """NAB's files as one JSONL file, each file's readings one after another (one device per file)."""
    from liquidstream.pipeline.eval.nab_scoring import load_corpus

    n = 0
    with path.open("w") as f:
        for nab in load_corpus(data_dir):
            for t, v in zip(nab.timestamps.tolist(), nab.values.tolist(), strict=True):
                f.write(json.dumps({"device_id": nab.name, "ts": t, "values": [v]}) + "\n")
                n += 1
    return n


def replay(path: Path, out_dir: Path, step_path: str) -> tuple[float, float]:
    """(readings/s, wall seconds) of ``liquidstream replay`` on ``path``, end to end, as a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), LIQUIDSTREAM_OPERATOR__STEP_PATH=step_path)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "liquidstream", "replay", "--input", str(path),  # noqa: S603
                           "--out", str(out_dir), "--quiet"], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary["valid"] / wall, wall


def replays(readings: int, nab: Path | None) -> dict[str, Any]:
    """``liquidstream replay`` end to end; before (``step_path=tensor``) on the 10,000-device file and on the
    first 3,000 readings of the one-device file (the tensor path replays one device at a few hundred readings/s)."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for devices in (1, 10_000):
            ids, ts, vals = make_events(devices, max(1, readings // devices), 8, seed=3)
            path = Path(tmp) / f"fleet_{devices}.jsonl"
            write_jsonl(path, ids, ts, vals)
            runs.append((f"replay_{devices}", path, "auto"))
            if devices == 1:
                path = Path(tmp) / "fleet_1_prefix.jsonl"
                write_jsonl(path, ids[:3000], ts[:3000], vals[:3000])
            runs.append((f"before_replay_{devices}", path, "tensor"))
        if nab is not None:
            path = Path(tmp) / "nab.jsonl"
            out["nab_readings"] = nab_jsonl(nab, path)
            runs.append(("replay_nab", path, "auto"))
        for key, path, step_path in runs:
            rate, wall = replay(path, Path(tmp) / f"out_{key}", step_path)
            out[key], out[f"{key}_wall_s"] = round(rate), round(wall, 1)
            print(f"{key}: {rate:,.0f} readings/s end to end ({wall:.1f} s, {path.stat().st_size / 1e6:.0f} MB in, "
                  f"step_path={step_path})", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer readings, one repeat (about two minutes)")
    p.add_argument("--shapes", default="1,10,200,10000,100000", help="comma-separated device counts")
    p.add_argument("--readings", type=int, default=0, help="readings per shape (default 300,000; quick 200,000)")
    p.add_argument("--repeats", type=int, default=0, help="runs per figure, median (default 3; quick 1)")
    p.add_argument("--loop-events", type=int, default=2000, help="readings timed in the per-event loop")
    p.add_argument("--replay-readings", type=int, default=0, help="readings per replay file (default 100,000; "
                                                                  "quick 50,000)")
    p.add_argument("--skip-replay", action="store_true")
    p.add_argument("--nab", type=Path, default=None, help="NAB's folder: also replay NAB end to end")
    p.add_argument("--crossover", action="store_true", help="only time both paths at 1-16 readings per device")
    args = p.parse_args()
    settings = Settings()
    settings.configure_torch()
    batch = settings.batch_max_messages
    repeats = args.repeats or (1 if args.quick else 3)
    torch.manual_seed(0)
    model = Forecaster(n_channels=8, hidden_size=64, cell="cfc").eval()
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": batch, "repeats": repeats,
                           "cpu": os.cpu_count(), "torch": torch.__version__}
    if args.crossover:
        out |= crossover(model, batch, repeats)
        print(json.dumps(out))
        return
    readings = args.readings or (200_000 if args.quick else 300_000)
    counts = [int(d) for d in args.shapes.split(",") if d]
    out |= shapes(model, counts, readings, batch, repeats, args.loop_events)
    out["readings"] = readings
    if 100_000 in counts:
        mem = measure_memory("store", 100_000, 64, 8)
        out["bytes_per_device_100000"] = mem["bytes_per_device"]
        print(f"memory at 100,000 devices: {mem['bytes_per_device']} B/device", flush=True)
    if not args.skip_replay:
        out |= replays(args.replay_readings or (50_000 if args.quick else 100_000), args.nab)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
