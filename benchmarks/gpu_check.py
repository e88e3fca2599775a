"""Train and serve on CUDA when present (else the CPU): training samples/s and serving events/s.

Usage: ``python3 benchmarks/gpu_check.py [--quick] [--devices 1000000] [--events-per-device 4] [--steps 20]``

* **training**: :meth:`OnlineLearner.learn <liquidstream.operators.online.learner.OnlineLearner.learn>` on a replay
buffer filled
  with synthetic windows (``--train-batch`` windows of ``--window`` readings per step, ``--steps`` steps,
  after one warm-up update); samples/s = readings through the shared training step (forward and backward)
  per second, with bf16 autocast and in fp32 on CUDA, fp32 on the CPU.  Also the learner's ``observe``
  (shadow operator, window assembly, serving-model rollouts) in events/s.
* **serving**: :meth:`LiquidOperator.process <liquidstream.operators.operator.LiquidOperator.process>` over
``--devices``
  devices sending ``--events-per-device`` readings each at irregular gaps, in batches of ``--batch``,
  synchronised on CUDA.  Without CUDA and with ``--quick`` the fleet shrinks to 20,000 devices.

Each part runs in its own ``try``: a failure is reported in the JSON (``*_error``), never a crash.  Prints the
device name, a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings  # noqa: E402

T0_MS = 1_767_225_600_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _events(devices: int, per_device: int, channels: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every device sends ``per_device`` readings 0.1-5 s apart; arrival order = event time across devices."""
    rng = np.random.default_rng(seed)
    gaps = rng.integers(100, 5000, size=(devices, per_device))
    ts = (T0_MS + np.cumsum(gaps, axis=1)).reshape(-1)
    order = np.argsort(ts, kind="stable")
    dev = np.repeat(np.arange(devices), per_device)[order]
    names = np.array([f"d{i}" for i in range(devices)], dtype=object)
    values = rng.normal(size=(devices * per_device, channels)).astype(np.float32)
    return names[dev].tolist(), ts[order], values[order]


def train_figures(args: argparse.Namespace, device: torch.device, out: dict[str, object]) -> None:
    from liquidstream.operators.online.config import OnlineSettings
    from liquidstream.operators.online.learner import (
        OnlineLearner,  # needs pydantic (OnlineSettings): imported here, not at the top
    )
    from liquidstream.operators.training import MIN_HISTORY

    n, w, c = max(4 * args.train_batch, 1024), args.window, args.channels
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.normal(size=(n, w, c)), axis=1).astype(np.float32)
    state = {"h": np.zeros((n, args.hidden), np.float32), "x_last": values[:, 0].copy(),
             "mean": values.mean(axis=1), "var": np.ones((n, c), np.float32),
             "count": np.full(n, MIN_HISTORY, np.float32)}
    dt = rng.uniform(0.5, 1.5, size=(n, w)).astype(np.float32)
    ids = [f"d{i % (n // 4)}" for i in range(n)]
    modes = [True, False] if device.type == "cuda" else [False]
    for amp in modes:
        torch.manual_seed(0)
        model = Forecaster(n_channels=c, hidden_size=args.hidden, cell=args.cell)
        settings = OnlineSettings(window=w, buffer_windows=n, max_windows_per_device=n, batch_windows=args.train_batch,
                                  steps_per_update=args.steps, min_windows=args.train_batch, holdout_fraction=0.05,
                                  max_device_share=1.0, amp=amp, guard_validation=False)
        learner = OnlineLearner(model, OperatorSettings(), settings, device=device)
        learner.buffer.add(ids, values, dt, np.ones((n, w), bool), state)
        learner.learn()  # warm-up: kernels, allocator, autotuning
        _sync(device)
        decision = learner.learn()
        tag = "bf16" if amp else "fp32"
        out[f"train_samples_per_s_{tag}"] = round(decision.figures["samples_per_s"], 1)
        out[f"train_loss_{tag}"] = round(decision.figures["train_loss"], 4)
    out.update({"train_batch_windows": args.train_batch, "train_window": w, "train_steps": args.steps})
    # observe: the trainer worker's per-batch path (shadow operator + windows + serving-model rollouts)
    obs_devices = 2_000 if args.quick else 100_000
    o_ids, o_ts, o_vals = _events(obs_devices, 2 * w, c, seed=3)
    learner = OnlineLearner(Forecaster(n_channels=c, hidden_size=args.hidden, cell=args.cell), OperatorSettings(),
                            OnlineSettings(window=w, max_tracked_devices=obs_devices), device=device)
    half = len(o_ids) // 2
    learner.observe(o_ids[:half], o_ts[:half], o_vals[:half])  # warm-up, and every device gets tracked
    _sync(device)
    start = time.perf_counter()
    stats = learner.observe(o_ids[half:], o_ts[half:], o_vals[half:])
    _sync(device)
    out["observe_events_per_s"] = round((len(o_ids) - half) / (time.perf_counter() - start), 1)
    out["observe_devices"], out["observe_windows"] = obs_devices, stats.windows_completed
    out["learner_memory_mb"] = round(learner.memory_bytes / 2**20, 1)


def serve_figures(args: argparse.Namespace, device: torch.device, out: dict[str, object]) -> None:
    devices = args.devices
    if device.type != "cuda" and args.quick:
        devices = min(devices, 20_000)
    ids, ts, vals = _events(devices, args.events_per_device, args.channels, seed=1)
    torch.manual_seed(0)
    model = Forecaster(n_channels=args.channels, hidden_size=args.hidden, cell=args.cell)
    batch = args.batch
    warm = LiquidOperator(model, OperatorSettings(), device=device, initial_capacity=1 << 20)
    warm.process(ids[:batch], ts[:batch], vals[:batch])  # warm-up: allocation, kernels, first-event paths
    del warm
    op = LiquidOperator(model, OperatorSettings(), device=device, initial_capacity=1 << 20)
    _sync(device)
    start = time.perf_counter()
    for lo in range(0, len(ids), batch):
        op.process(ids[lo:lo + batch], ts[lo:lo + batch], vals[lo:lo + batch])
    _sync(device)
    secs = time.perf_counter() - start
    out.update({"serve_devices": devices, "serve_events": len(ids), "serve_batch": batch,
                "serve_events_per_s": round(len(ids) / secs, 1), "serve_seconds": round(secs, 2)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    p.add_argument("--devices", type=int, default=1_000_000)
    p.add_argument("--events-per-device", type=int, default=4)
    p.add_argument("--batch", type=int, default=0, help="serving batch (default 1,000,000 on CUDA, 50,000 on CPU)")
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--cell", default="cfc")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--train-batch", type=int, default=0, help="windows per step (default 1024 CUDA, 128 CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the worker's policy: half the cores
    args.batch = args.batch or (1_000_000 if cuda else 50_000)
    args.train_batch = args.train_batch or (1024 if cuda else 128)
    if args.quick:
        args.steps = min(args.steps, 5)
        args.train_batch = min(args.train_batch, 64)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"device: {name} (torch {torch.__version__})", flush=True)
    out: dict[str, object] = {"device": str(device), "device_name": name, "torch": torch.__version__,
                              "quick": args.quick, "channels": args.channels, "hidden": args.hidden, "cell": args.cell}
    parts = [("train", train_figures, args.skip_train), ("serve", serve_figures, args.skip_serve)]
    for part, fn, skip in parts:
        if skip:
            continue
        start = time.perf_counter()
        try:
            fn(args, device, out)
        except Exception as ex:  # noqa: BLE001 - a benchmark that must report, not crash, on a lent machine
            out[f"{part}_error"] = f"{type(ex).__name__}: {ex}"
            traceback.print_exc()
        out[f"{part}_wall_s"] = round(time.perf_counter() - start, 1)
        if cuda:
            out["cuda_max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    for k, v in out.items():
        print(f"{k:28s} {v}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
