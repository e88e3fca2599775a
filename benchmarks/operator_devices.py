"""LiquidOperator on CPU and (when present) CUDA: parity of results and throughput of the real path.

Usage: ``.venv/bin/python benchmarks/operator_devices.py [--devices 100000] [--events-per-device 8]
[--channels 8] [--hidden 64] [--batch 200000]``

Events: every device sends ``events-per-device`` readings with irregular gaps (0.1-5 s), in random device
interleaving.  The timed region is ``LiquidOperator.process`` (planning, state gather/scatter, cell, scoring,
alerts), synchronised on CUDA.  Parity: the first 20,000 events run on both devices and must agree to 1e-3.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings  # noqa: E402


def make_events(devices: int, per_device: int, channels: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dev = np.repeat(np.arange(devices), per_device)
    gaps = rng.uniform(100, 5000, size=(devices, per_device)).astype(np.int64)  # ms
    ts = (1_767_225_600_000 + np.cumsum(gaps, axis=1)).reshape(-1)
    order = np.argsort(ts, kind="stable")  # arrival order = event time across devices: random interleaving
    values = rng.normal(size=(devices * per_device, channels)).astype(np.float32)
    ids = np.array([f"d{i}" for i in range(devices)], dtype=object)[dev[order]].tolist()
    return ids, ts[order], values[order]


def run(device: str, model: Forecaster, ids: list[str], ts: np.ndarray, vals: np.ndarray,
        batch: int) -> tuple[float, list]:
    op = LiquidOperator(model, OperatorSettings(), device=device, initial_capacity=1 << 20)
    results = []
    op.process(ids[:batch], ts[:batch], vals[:batch])  # warm-up: allocation, kernels, first-event paths
    op = LiquidOperator(model, OperatorSettings(), device=device, initial_capacity=1 << 20)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for lo in range(0, len(ids), batch):
        results.append(op.process(ids[lo:lo + batch], ts[lo:lo + batch], vals[lo:lo + batch]))
    if device == "cuda":
        torch.cuda.synchronize()
    return len(ids) / (time.perf_counter() - start), results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=100_000)
    p.add_argument("--events-per-device", type=int, default=8)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=200_000)
    p.add_argument("--cell", default="cfc")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = half the cores)")
    args = p.parse_args()
    # The worker's policy (liquidstream.pipeline.settings.Settings.configure_torch): half the cores.  Not imported, so
    # this script runs where only torch and numpy are installed (the GPU machine).
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // 2))
    torch.manual_seed(0)
    model = Forecaster(n_channels=args.channels, hidden_size=args.hidden, cell=args.cell)
    ids, ts, vals = make_events(args.devices, args.events_per_device, args.channels, seed=1)
    out: dict[str, object] = {"devices": args.devices, "events": len(ids), "channels": args.channels,
                              "hidden": args.hidden, "cell": args.cell, "batch": args.batch}
    # parity on a small prefix
    n = min(20_000, len(ids))
    ref = LiquidOperator(model, OperatorSettings()).process(ids[:n], ts[:n], vals[:n])
    if torch.cuda.is_available():
        got = LiquidOperator(model, OperatorSettings(), device="cuda").process(ids[:n], ts[:n], vals[:n])
        ok = np.isfinite(ref.forecast)
        out["cuda_parity_max_abs_forecast"] = float(np.abs(ref.forecast[ok] - got.forecast[ok]).max(initial=0.0))
        sok = np.isfinite(ref.score)  # first readings have no score
        out["cuda_parity_max_abs_score"] = float(np.abs(ref.score[sok] - got.score[sok]).max(initial=0.0))
        out["gpu"] = torch.cuda.get_device_name(0)
        eps, _ = run("cuda", model, ids, ts, vals, args.batch)
        out["cuda_events_per_s"] = round(eps, 1)
    if not args.skip_cpu:
        eps, _ = run("cpu", model, ids, ts, vals, args.batch)
        out["cpu_events_per_s"] = round(eps, 1)
    for k, v in out.items():
        print(f"{k:32s} {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
