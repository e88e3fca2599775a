"""``liquidstream export``: the model's single step with explicit state, as ONNX or TorchScript, for an edge
runtime (:mod:`liquidstream.pipeline.offline.export`).  Prints one JSON line: the file, its size, the names of its
inputs, outputs and state, and (ONNX, with onnxruntime installed) the largest forecast difference between the file
and PyTorch over a short irregular stream.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from liquidstream.pipeline.cli.args import Command, Handler, require_extra
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.settings import Settings

__all__ = ["COMMANDS", "register_export"]

#: Modules each format needs, beyond the worker's own dependencies (the ``export`` extra).
NEEDS: dict[str, tuple[str, ...]] = {"onnx": ("onnx", "onnxscript"), "torchscript": ()}


def register_export(sub: Any) -> Handler:
    p = sub.add_parser("export", help="the model's single step with explicit state, as ONNX or TorchScript")
    p.add_argument("--model", required=True, help="model.pt (with its model.json) to export")
    p.add_argument("--format", dest="export_format", choices=sorted(NEEDS), default="onnx",
                   help="onnx (onnxruntime and other ONNX runtimes) or torchscript (torch.jit.load)")
    p.add_argument("--out", required=True, help="file to write, e.g. model.onnx or model.ts")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the ONNX file against PyTorch (done when onnxruntime is installed)")
    return _cmd_export


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    for module in NEEDS[args.export_format]:
        require_extra(module, "export", f"`liquidstream export --format {args.export_format}`")
    model_path, out = Path(args.model), Path(args.out)
    if not model_path.is_file():
        msg = f"--model {args.model}: no such file"
        raise ConfigurationError(msg)
    if out.is_dir():
        msg = f"--out {args.out} is a directory: name the file to write"
        raise ConfigurationError(msg)
    import importlib.util

    from liquidstream.operators.model_io import load_model
    from liquidstream.pipeline.offline.export import check_onnx, export_step

    model, doc = load_model(model_path, "cpu")
    info = export_step(model, settings.operator, args.export_format, out)
    info["model_version"] = doc["version"]
    if args.export_format == "onnx" and not args.no_check and importlib.util.find_spec("onnxruntime") is not None:
        info["check_max_abs_diff"] = check_onnx(model, settings.operator, out)
    print(json.dumps(info), flush=True)
    return 0


#: ``(name, register)`` pairs; ``register(subparsers)`` adds the sub-command and returns its handler.
COMMANDS: list[Command] = [("export", register_export)]
