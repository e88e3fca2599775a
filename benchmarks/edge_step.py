"""The exported edge step (``liquidstream export``): file sizes and per-step latency on this CPU.

Usage: ``.venv/bin/python benchmarks/edge_step.py [--channels 4] [--hidden 32] [--steps 5000] [--out DIR]``

Exports one model (an untrained CfC ``Forecaster`` with a random head, the size of ``liquidstream train``'s
default: 4 channels, 32 hidden units, unless told otherwise) to ONNX and TorchScript, then loops each file over
an irregular stream of one device, one reading per call (batch of 1), feeding the state each call returns into
the next: onnxruntime (CPU provider, one intra-op thread) and ``torch.jit.load`` (one torch thread, no autograd),
next to the eager PyTorch step for reference.  Per-step latency is the median (and p99) of ``--steps`` timed calls
after 200 warm-up calls.  Prints one JSON object.  Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from liquidstream.operators import Forecaster, OperatorSettings
from liquidstream.operators.edge_step import INPUTS, EdgeStep
from liquidstream.pipeline.offline.export import export_step, stream_inputs

WARMUP = 200
Step = Callable[[list[np.ndarray]], list[np.ndarray]]


def _onnx(path: Path) -> Step:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda arrays: session.run(None, dict(zip(INPUTS, arrays, strict=True)))


def _module(module: Callable[..., tuple[torch.Tensor, ...]]) -> Step:
    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in module(*(torch.from_numpy(a) for a in arrays))]

    return run


def _time(step: Step, state: list[np.ndarray], dt: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """Median and p99 milliseconds per call over the stream (after WARMUP calls), state fed back each time."""
    took = []
    learn = np.ones(1, np.bool_)
    for i in range(dt.shape[0]):
        t0 = time.perf_counter()
        out = step([values[i:i + 1], dt[i:i + 1], learn, *state])
        took.append(time.perf_counter() - t0)
        state = list(out[5:])
    timed = sorted(took[WARMUP:])
    return {"median_ms": round(statistics.median(timed) * 1e3, 4),
            "p99_ms": round(timed[int(0.99 * (len(timed) - 1))] * 1e3, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=None, help="keep the exported files here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Forecaster(n_channels=args.channels, hidden_size=args.hidden, cell="cfc").eval()
    for p in model.head[-1].parameters():
        torch.nn.init.normal_(p, std=0.2)
    settings = OperatorSettings()
    out = args.out or Path(tempfile.mkdtemp(prefix="edge-step-"))
    files = {"onnx": out / "model.onnx", "torchscript": out / "model.ts"}
    export_s = {}
    for fmt, path in files.items():
        t0 = time.perf_counter()
        export_step(model, settings, fmt, path)
        export_s[fmt] = round(time.perf_counter() - t0, 2)
    dt, values = stream_inputs(args.steps + WARMUP, args.channels, seed=0)
    init = [t.numpy() for t in EdgeStep(model, settings).initial_state(1)]
    steps: dict[str, Step] = {"onnxruntime": _onnx(files["onnx"]),
                              "torchscript": _module(torch.jit.load(str(files["torchscript"]))),
                              "pytorch_eager": _module(EdgeStep(model, settings))}
    latency = {name: _time(step, list(init), dt, values) for name, step in steps.items()}
    import onnxruntime

    print(json.dumps({"channels": args.channels, "hidden": args.hidden, "steps": args.steps, "batch": 1,
                      "bytes": {fmt: path.stat().st_size for fmt, path in files.items()}, "export_s": export_s,
                      "latency": latency, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                      "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
