"""The offline sub-commands of ``liquidstream``: ``demo``, ``replay``, ``train``, ``evaluate`` (no broker).

Each ``register_*`` adds its sub-command to the parser and returns its handler; :data:`COMMANDS` lists them
for :mod:`liquidstream.pipeline.cli.entry`.  Heavy modules (torch, the evaluation code) are imported when a
command runs, not by ``--help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from liquidstream.pipeline.cli.args import (
    Command,
    Handler,
    commissioning_flag,
    fraction,
    mapping_flags,
    model_flags,
    positive_float,
    positive_int,
    require_extra,
    with_commissioning,
)
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.settings import Settings

__all__ = ["COMMANDS"]


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("matplotlib", "plot", "`liquidstream demo` (its plot.png)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        msg = f"--out {args.out}: is a file; give a folder (created if missing) for the demo's outputs"
        raise ConfigurationError(msg)
    from liquidstream.pipeline.offline.demo import DemoConfig, run_demo

    cfg = DemoConfig(devices=args.devices, duration_s=args.duration_s, seed=args.seed, cell=args.cell,
                     epochs=args.epochs, hidden_size=args.hidden_size)
    summary = run_demo(settings, Path(args.out), cfg, show=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("events", "devices", "predictions", "alerts", "precision",
                                              "recall", "events_per_s")}))
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from liquidstream.pipeline.offline.replay import ReplayConfig, run_replay

    settings = with_commissioning(args, settings)
    if args.model is None and args.train_fraction == 0:
        print("liquidstream replay: warning: no --model: replaying an UNTRAINED model (its forecast is the last "
              "reading and its alerts mean little); give --model model.pt, or --train-fraction 0.3 to train on the "
              "first 30 % of each device's readings", file=sys.stderr)
    cfg = ReplayConfig(model=Path(args.model) if args.model else None, train_fraction=args.train_fraction,
                       epochs=args.epochs, cell=args.cell, hidden_size=args.hidden_size)
    out = Path(args.out)
    summary = run_replay(settings, Path(args.input), out, cfg, show=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("lines", "valid", "invalid", "predictions", "alerts")}))
    if summary["valid"] == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in summary["invalid_by_reason"].items()) or "empty file"
        print(f"liquidstream replay: error: no valid reading in {args.input} ({reasons}; each line's reason is in "
              f"{out / 'invalid.jsonl'}); check the channel count and the input mapping (--shape, --channel-fields)",
              file=sys.stderr)
        return 2
    return 0


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from liquidstream.pipeline.offline.replay import train_from_file

    result = train_from_file(settings, Path(args.input), Path(args.out), cell=args.cell,
                             hidden_size=args.hidden_size, epochs=args.epochs, show=not args.quiet)
    if result["skipped"]:
        reasons = ", ".join(f"{n} {r}" for r, n in result["skipped_by_reason"].items())
        print(f"liquidstream train: warning: skipped {result['skipped']} invalid line(s) of {args.input} ({reasons}); "
              "`liquidstream replay` lists each with its reason in invalid.jsonl", file=sys.stderr)
    print(json.dumps(result))
    return 0


def _cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    if not args.no_peers and args.benchmark != "nab":
        require_extra("river", "eval", f"`liquidstream evaluate {args.benchmark}` with its River peers (or --no-peers)")
    if args.benchmark == "irregular":
        from liquidstream.pipeline.eval.irregular.study import IRREGULAR_EPOCHS, evaluate_irregular, format_irregular

        irr = evaluate_irregular(settings, epochs=args.epochs or IRREGULAR_EPOCHS, hidden_size=args.hidden_size,
                                 seeds=args.seeds, peers=not args.no_peers, objectives=(args.objective,),
                                 stream_names=tuple(args.streams.split(",")),
                                 sim_train_devices=args.sim_train_devices)
        print(format_irregular(irr))
        if args.json:
            print(json.dumps(irr))
        return 0
    if not args.data_dir:
        folder = "SKAB's data/ folder" if args.benchmark == "skab" else "NAB's folder (data/, labels/, config/)"
        print(f"liquidstream evaluate {args.benchmark}: --data-dir is required ({folder})", file=sys.stderr)
        return 2
    report: dict[str, Any]
    if args.benchmark == "nab":
        from liquidstream.pipeline.eval.nab_eval import evaluate_nab, format_nab

        report = evaluate_nab(settings, Path(args.data_dir), epochs=args.epochs or 20, cell=args.cell,
                              hidden_size=args.hidden_size, ablations=not args.no_ablations)
        print(format_nab(report))
    else:
        from liquidstream.pipeline.eval.skab_eval import evaluate_skab, format_table

        report = evaluate_skab(settings, Path(args.data_dir), epochs=args.epochs or 20, cell=args.cell,
                               hidden_size=args.hidden_size, peers=not args.no_peers, ablations=not args.no_ablations)
        print(format_table(report))
    if args.json:
        print(json.dumps(report))
    return 0


def register_demo(sub: Any) -> Handler:
    p = sub.add_parser("demo", help="simulate a fleet, train, stream and score it (no broker)")
    p.add_argument("--out", default="demo-output", help="folder for summary.json, predictions.jsonl, alerts.jsonl, "
                                                        "incidents.jsonl, model.pt and plot.png")
    p.add_argument("--devices", type=positive_int, default=200, help="simulated devices")
    p.add_argument("--duration-s", type=positive_float, default=1800.0, help="simulated seconds per device")
    p.add_argument("--seed", type=int, default=7, help="random seed of the simulation and the training")
    model_flags(p, epochs=8)
    return _cmd_demo


def register_replay(sub: Any) -> Handler:
    p = sub.add_parser("replay", help="stream a JSONL file of readings through the operator")
    p.add_argument("--input", required=True, help="JSONL file of readings (shape: see --shape)")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl, alerts.jsonl, invalid.jsonl and "
                                                "summary.json (created if missing)")
    p.add_argument("--model", default=None, help="model.pt saved by `liquidstream train`/`demo` (default: an "
                                                 "untrained model, with a warning, unless --train-fraction)")
    p.add_argument("--train-fraction", type=fraction, default=0.0,
                   help="train a model on the first fraction of each device's readings (by event time); those "
                        "readings are then the device's commissioning data")
    commissioning_flag(p)  # --train-fraction sets it per device, to each device's training part
    model_flags(p, epochs=8)
    mapping_flags(p)
    return _cmd_replay


def register_train(sub: Any) -> Handler:
    p = sub.add_parser("train", help="train a forecaster offline on a JSONL file of readings")
    p.add_argument("--input", required=True, help="JSONL file of readings (e.g. from `liquidstream simulate --out`)")
    p.add_argument("--out", required=True, help="model file to write (model.pt, with its model.json beside it)")
    model_flags(p, epochs=8)
    mapping_flags(p)
    return _cmd_train


def register_evaluate(sub: Any) -> Handler:
    p = sub.add_parser("evaluate", help="accuracy: NAB or SKAB next to published detectors, or the "
                                        "irregular-sampling study (docs/evaluation.md)")
    p.add_argument("benchmark", choices=["nab", "skab", "irregular"])
    p.add_argument("--data-dir", default=None,
                   help="required by nab and skab (default: none): NAB's folder (e.g. ../shared/data/nab), SKAB's "
                        "data/ folder (e.g. ../shared/data/skab/data)")
    p.add_argument("--json", action="store_true",
                   help="end with one JSON line (nab: standard, reward_low_fp, reward_low_fn, ablations ...; "
                        "skab: f1, far, mar, ablations ...)")
    p.add_argument("--no-peers", action="store_true", help="skip the River peers")
    p.add_argument("--no-ablations", action="store_true", help="nab, skab: run the defaults only")
    p.add_argument("--seeds", type=int, default=2, help="irregular: seeds per model")
    p.add_argument("--objective", choices=["mse", "nll", "beta-nll"], default="mse",
                   help="irregular: train the mean only (mse, unit spread), mean and spread (nll, production) "
                        "or mean and spread with the mean's gradient of squared error (beta-nll)")
    p.add_argument("--streams", default="co2,elnino,waterflow,simulator",
                   help="irregular: comma-separated streams among co2, elnino, waterflow, simulator, sines (control)")
    p.add_argument("--sim-train-devices", type=positive_int, default=96,
                   help="irregular: simulated devices the simulator stream's models train on (32 others are held out)")
    model_flags(p, epochs=20)
    p.set_defaults(epochs=None)  # per benchmark: skab 20, irregular IRREGULAR_EPOCHS
    for action in p._actions:
        if action.dest == "epochs":
            action.help = "training epochs (default: 20; irregular: its own)"
    return _cmd_evaluate


COMMANDS: list[Command] = [
    ("demo", register_demo),
    ("replay", register_replay),
    ("train", register_train),
    ("evaluate", register_evaluate),
]
