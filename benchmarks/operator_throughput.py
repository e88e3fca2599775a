"""LiquidOperator against the seed-style per-event loop, side by side, plus state memory per device.

Usage: ``.venv/bin/python benchmarks/operator_throughput.py [--quick] [--repeats 3] [--threads 1]
[--device cpu|cuda] [--devices 10000,100000]``

Both paths run the same model on the same events in the same process and run:

* **operator**: ``LiquidOperator.process`` over batches of ``--batch`` readings (state store, wave planning,
  event-time policies, dt, scoring, alert state machine, results back in input order);
* **per-event loop** (the seed's shape, written here): one reading at a time, the device's state in a dict
  of tensors, normalise, forecast-and-score against the previous state, update the running statistics,
  advance the cell by the real gap, forecast the next reading.  It does *less* than the operator (no wave
  planning, no policies, no alert state machine), so the ratio is conservative.  It is timed on the first
  ``--loop-events`` readings of the same stream (it is too slow for all of them).

Besides wall-clock rates the operator's rate per second of process CPU time is reported
(``events_per_cpu_s``): with one torch thread it approaches the rate a quiet machine gives, and it moves
much less than wall time when other processes share the cores.

Events: ``--events-per-device`` readings per device with irregular gaps (0.1-5 s, epoch ms), in random
device interleaving; 8 channels and 64 hidden units unless told.  Figures are medians over ``--repeats``
runs (each a fresh operator).  Memory: bytes per device at ``--memory-devices`` devices, measured as the
growth of the process's resident set (``/proc/self/statm``) in a fresh subprocess while the devices are
created from ids made inside the measured region (so the index's copies of the id strings count), for the
:class:`~liquidstream.operators.state.store.DeviceStateStore` and for a dict-of-tensors store holding the same fields.
The last line printed is one JSON object (``events_per_s``, ``per_event_loop_events_per_s``, ``speedup``,
``bytes_per_device``, ...).  Not a test: it asserts nothing, it prints figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings  # noqa: E402
from liquidstream.operators.normalization import normalise, scale, update_stats  # noqa: E402
from liquidstream.operators.state.store import DeviceStateStore  # noqa: E402

T0_MS = 1_767_225_600_000


def make_events(devices: int, per_device: int, channels: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Readings of ``devices`` devices, irregular gaps (100-5000 ms), arrival order = event time (interleaved)."""
    rng = np.random.default_rng(seed)
    dev = np.repeat(np.arange(devices), per_device)
    gaps = rng.uniform(100, 5000, size=(devices, per_device)).astype(np.int64)
    ts = (T0_MS + np.cumsum(gaps, axis=1)).reshape(-1)
    order = np.argsort(ts, kind="stable")
    values = rng.normal(size=(devices * per_device, channels)).astype(np.float32)
    names = np.array([f"device-{i:07d}" for i in range(devices)], dtype=object)
    return names[dev[order]].tolist(), ts[order], values[order]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_operator(model: Forecaster, ids: list[str], ts: np.ndarray, vals: np.ndarray, batch: int,
                 device: str) -> tuple[float, float]:
    """Events per second of ``LiquidOperator.process`` over the whole stream (fresh operator): per wall-clock
    second, and per second of this process's CPU time (all threads; steadier than wall time on a busy box)."""
    op = LiquidOperator(model, OperatorSettings(), device=device)
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for lo in range(0, len(ids), batch):
        op.process(ids[lo:lo + batch], ts[lo:lo + batch], vals[lo:lo + batch])
    sync(device)
    return len(ids) / (time.perf_counter() - start), len(ids) / (time.process_time() - cpu)


@torch.no_grad()
def run_per_event(model: Forecaster, ids: list[str], ts: np.ndarray, vals: np.ndarray, device: str,
                  alpha: float = 0.005) -> float:
    """Events per second of the seed-style loop: one reading, one device state dict, one model call at a time."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    dev = torch.device(device)
    sync(device)
    start = time.perf_counter()
    for i, device_id in enumerate(ids):
        x = torch.as_tensor(vals[i:i + 1], device=dev)
        t_ms = int(ts[i])
        st = states.get(device_id)
        if st is None:
            st = {"h": model.initial_state(1, dev), "mean": torch.zeros_like(x), "var": torch.ones_like(x),
                  "count": torch.zeros(1, device=dev), "last_ts": torch.tensor([t_ms]), "x_last": x}
            states[device_id] = st
            dt = torch.zeros(1, device=dev)
        else:
            dt = torch.tensor([(t_ms - int(st["last_ts"][0])) / 1000.0], device=dev)  # ms -> s
            mu, sd = model.forecast(st["h"], normalise(st["x_last"], st["mean"], st["var"]), dt)
            score = ((x - st["mean"]) / scale(st["mean"], st["var"]) - mu).abs().div(sd).amax()
            st["score"] = score  # kept, as the seed kept its last score per device
        st["mean"], st["var"] = update_stats(st["mean"], st["var"], st["count"], x, alpha)
        x_n = normalise(x, st["mean"], st["var"])
        st["h"] = model.advance(st["h"], x_n, dt)
        st["forecast"], st["forecast_std"] = model.forecast(st["h"], x_n, torch.ones(1, device=dev))
        st["count"] = st["count"] + 1
        st["last_ts"], st["x_last"] = torch.tensor([t_ms]), x
    sync(device)
    return len(ids) / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(kind: str, devices: int, hidden: int, channels: int) -> dict[str, Any]:
    """Run in a fresh process: resident-set growth while ``devices`` devices are created in a store."""
    warm = DeviceStateStore(hidden, channels, initial_capacity=16)  # torch's one-time allocations first
    warm.gather(torch.as_tensor(warm.rows_for(["warm-up"])[0]))
    del warm
    gc.collect()
    before = _rss_bytes()
    if kind == "store":
        store = DeviceStateStore(hidden, channels)
        for lo in range(0, devices, 10_000):  # ids made here, as a consumer decodes them: the index keeps them
            store.rows_for([f"device-{i:07d}" for i in range(lo, min(lo + 10_000, devices))])
        held: object = store
        extra = {"capacity": store.capacity, "array_bytes_per_device": round(store.nbytes() / devices, 1),
                 "index_bytes_per_device": round(store.index_nbytes() / devices, 1)}
    else:
        fields = {"h": (hidden,), "x_last": (channels,), "mean": (channels,), "var": (channels,),
                  "calib": (channels,), "score_mean": (), "score_var": (), "gap_ema": (), "z2_fast": ()}
        states: dict[str, dict[str, torch.Tensor]] = {}
        for i in range(devices):
            st = {name: torch.zeros(shape) for name, shape in fields.items()}
            st |= {"alert_open": torch.zeros((), dtype=torch.bool),
                   "alert_since_ms": torch.zeros((), dtype=torch.int64),
                   "cooldown_ms": torch.zeros((), dtype=torch.int64), "calm": torch.zeros((), dtype=torch.int32),
                   "stuck": torch.zeros(channels, dtype=torch.int16),
                   "last_ts_ms": torch.zeros((), dtype=torch.int64), "count": torch.zeros((), dtype=torch.int32)}
            states[f"device-{i:07d}"] = st
        held = states
        extra = {}
    gc.collect()
    grown = _rss_bytes() - before
    del held
    return {"kind": kind, "devices": devices, "rss_growth_bytes": grown,
            "bytes_per_device": round(grown / devices, 1), **extra}


def measure_memory(kind: str, devices: int, hidden: int, channels: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--memory-probe", kind, "--memory-devices", str(devices),
           "--hidden", str(hidden), "--channels", str(channels)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout  # noqa: S603 (own argv)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer events and repeats (about a minute)")
    p.add_argument("--devices", default="10000,100000", help="comma-separated device counts")
    p.add_argument("--events-per-device", type=int, default=0, help="default 6 (quick: 3)")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=20_000, help="readings per process() call")
    p.add_argument("--loop-events", type=int, default=0, help="readings timed in the per-event loop "
                   "(default 4000; quick: 2000)")
    p.add_argument("--repeats", type=int, default=0, help="runs per figure, median reported (default 3; quick: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the worker's default on 2 cores: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--memory-devices", type=int, default=100_000)
    p.add_argument("--memory-probe", choices=("store", "dict"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.memory_devices, args.hidden, args.channels)))
        return
    per_device = args.events_per_device or (3 if args.quick else 6)
    loop_events = args.loop_events or (2000 if args.quick else 4000)
    repeats = args.repeats or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Forecaster(n_channels=args.channels, hidden_size=args.hidden, cell="cfc").eval()
    out: dict[str, Any] = {"device": args.device, "threads": args.threads, "channels": args.channels,
                           "hidden": args.hidden, "batch": args.batch, "events_per_device": per_device,
                           "repeats": repeats, "torch": torch.__version__}
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    counts = [int(d) for d in args.devices.split(",") if d]
    for k, devices in enumerate(counts):
        ids, ts, vals = make_events(devices, per_device, args.channels, seed=1)
        run_operator(model, ids[:args.batch], ts[:args.batch], vals[:args.batch], args.batch, args.device)  # warm
        op_rates, op_cpu_rates, loop_rates = [], [], []
        for _ in range(repeats):  # interleaved, so both paths see the same machine load
            wall_rate, cpu_rate = run_operator(model, ids, ts, vals, args.batch, args.device)
            op_rates.append(wall_rate)
            op_cpu_rates.append(cpu_rate)
            loop_rates.append(run_per_event(model, ids[:loop_events], ts[:loop_events], vals[:loop_events],
                                            args.device))
        op_eps, loop_eps = statistics.median(op_rates), statistics.median(loop_rates)
        tag = "" if k == 0 else f"_{devices // 1000}k"
        out[f"devices{tag}"] = devices
        out[f"events{tag}"] = len(ids)
        out[f"events_per_s{tag}"] = round(op_eps, 1)
        out[f"per_event_loop_events_per_s{tag}"] = round(loop_eps, 1)
        out[f"speedup{tag}"] = round(op_eps / loop_eps, 1)
        out[f"events_per_s_runs{tag}"] = [round(r) for r in op_rates]
        out[f"events_per_cpu_s{tag}"] = round(statistics.median(op_cpu_rates), 1)
        out[f"per_event_loop_runs{tag}"] = [round(r) for r in loop_rates]
        print(f"{devices:>8} devices  {len(ids):>8} events  operator {op_eps:>12,.0f} ev/s "
              f"({statistics.median(op_cpu_rates):,.0f} per CPU-s)   "
              f"per-event loop {loop_eps:>9,.0f} ev/s   x{op_eps / loop_eps:.1f}", flush=True)
    store_mem = measure_memory("store", args.memory_devices, args.hidden, args.channels)
    dict_mem = measure_memory("dict", args.memory_devices, args.hidden, args.channels)
    out["memory_devices"] = args.memory_devices
    out["bytes_per_device"] = store_mem["bytes_per_device"]
    out["array_bytes_per_device"] = store_mem["array_bytes_per_device"]
    out["index_bytes_per_device"] = store_mem["index_bytes_per_device"]
    out["store_capacity"] = store_mem["capacity"]
    out["dict_of_tensors_bytes_per_device"] = dict_mem["bytes_per_device"]
    print(f"memory at {args.memory_devices} devices: store {store_mem['bytes_per_device']} B/device "
          f"(arrays {store_mem['array_bytes_per_device']}), dict of tensors {dict_mem['bytes_per_device']} B/device")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
