"""``liquidstream export``: a model's single step with explicit state, as an ONNX or TorchScript file for an edge
runtime to loop (:class:`~liquidstream.operators.edge_step.EdgeStep` says what goes in and out).

The operator settings that shape the step (``stats_alpha``, ``max_gap_s``, ``gap_policy``, ``warmup_events``,
``commissioning_events``) are baked in as constants; the batch size is free (one row per device).  ONNX goes
through PyTorch's ``torch.export``-based exporter (needs the ``export`` extra: onnx and onnxscript) into one
self-contained file; TorchScript is a trace (``torch.jit.load`` in a C++ or Python runtime, no extra).  With
onnxruntime installed, :func:`check_onnx` runs the file next to the PyTorch step over a short irregular stream.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.edge_step import INPUTS, OUTPUTS, STATE, EdgeStep
from liquidstream.operators.forecaster import Forecaster
from liquidstream.pipeline.errors import ConfigurationError

__all__ = ["FORMATS", "check_onnx", "example_inputs", "export_step", "stream_inputs"]


def example_inputs(step: EdgeStep, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of ``batch`` devices in :data:`~liquidstream.operators.edge_step.INPUTS` order (to trace with)."""
    c = step.model.n_channels
    return (torch.randn(batch, c), torch.linspace(0.5, 2.0, batch), torch.ones(batch, dtype=torch.bool),
            *step.initial_state(batch))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress lines and warnings (deprecations, trace notes on shape checks) stay out of stdout."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _onnx(step: EdgeStep, out: Path) -> None:
    import onnx  # the export extra

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(step, example_inputs(step), input_names=list(INPUTS), output_names=list(OUTPUTS),
                                dynamic_shapes={n: {0: batch} for n in INPUTS}, dynamo=True)
    if program is None:  # dynamo=True returns the program; None would be a torch without that exporter
        msg = f"torch {torch.__version__} did not return an ONNX program: export needs torch >= 2.5"
        raise ConfigurationError(msg)
    proto = program.model_proto
    # The exporter annotates every node with the Python stack and FX names that made it: two thirds of the
    # file, of no use to a runtime.
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save_model(proto, str(out))


def _torchscript(step: EdgeStep, out: Path) -> None:
    traced = torch.jit.trace(step, example_inputs(step), check_trace=False)  # type: ignore[no-untyped-call]
    traced.save(str(out))


#: ``--format`` -> writer of the file.
FORMATS: dict[str, Callable[[EdgeStep, Path], None]] = {"onnx": _onnx, "torchscript": _torchscript}


def export_step(model: Forecaster, settings: OperatorSettings, fmt: str, out: Path) -> dict[str, Any]:
    """Write ``model``'s edge step as ``fmt`` to ``out``; returns what a runtime needs to know about the file."""
    step = EdgeStep(model, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        FORMATS[fmt](step, out)
    return {"out": str(out), "format": fmt, "bytes": out.stat().st_size, "inputs": list(INPUTS),
            "outputs": list(OUTPUTS), "state": list(STATE), "channels": model.n_channels,
            "hidden_size": model.hidden_size, "baked": {"stats_alpha": settings.stats_alpha,
                                                        "max_gap_s": settings.max_gap_s,
                                                        "gap_policy": settings.gap_policy,
                                                        "warmup_events": settings.warmup_events,
                                                        "commissioning_events": settings.commissioning_events}}


def stream_inputs(n: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One device's irregular stream: gaps in seconds (float32 [n], 0.05 .. ~10 s, one of 100 s) and readings
    float32 [n, C]."""
    rng = np.random.default_rng(seed)
    dt = (rng.exponential(1.5, n) + 0.05).astype(np.float32)
    dt[n // 2] = 100.0
    t = np.cumsum(dt)
    values = np.sin(t[:, None] / 5.0 + np.arange(channels)) + 0.05 * rng.standard_normal((n, channels))
    return dt, values.astype(np.float32)


def check_onnx(model: Forecaster, settings: OperatorSettings, path: Path, steps: int = 200) -> float:
    """Largest absolute difference between the ONNX file (onnxruntime) and the PyTorch step, over the forecasts
    of a ``steps``-reading irregular stream of one device."""
    import onnxruntime as ort  # the export extra

    step = EdgeStep(model, settings)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # batches of one device: more threads only spin
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    dt, values = stream_inputs(steps, model.n_channels, seed=1)
    state = [t.numpy() for t in step.initial_state(1)]
    torch_state = step.initial_state(1)
    worst = 0.0
    with torch.no_grad():
        for i in range(steps):
            head = [values[i:i + 1], dt[i:i + 1], np.ones(1, np.bool_)]
            got = session.run(None, dict(zip(INPUTS, [*head, *state], strict=True)))
            want = step(*(torch.from_numpy(a) for a in head), *torch_state)
            worst = max(worst, float(np.abs(got[2] - want[2].numpy()).max()))
            state, torch_state = got[5:], want[5:]
    return worst
