"""The ``liquidstream`` command line: one sub-command per job, settings built once and passed down.

Flags override ``LIQUIDSTREAM_*`` environment variables; a flag left out keeps the environment's value.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydantic

from operators.errors import LiquidStreamError
from pipeline.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _settings(args: argparse.Namespace) -> Settings:
    """Environment first, then every flag that maps to a settings field and was given."""
    fields = Settings.model_fields
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return Settings(**overrides)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.demo import DemoConfig, run_demo

    cfg = DemoConfig(devices=args.devices, duration_s=args.duration_s, seed=args.seed, cell=args.cell,
                     epochs=args.epochs, hidden_size=args.hidden_size)
    summary = run_demo(settings, Path(args.out), cfg, show=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("events", "devices", "predictions", "alerts", "precision",
                                              "recall", "events_per_s")}))
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.replay import ReplayConfig, run_replay

    cfg = ReplayConfig(model=Path(args.model) if args.model else None, train_fraction=args.train_fraction,
                       epochs=args.epochs, cell=args.cell, hidden_size=args.hidden_size)
    summary = run_replay(settings, Path(args.input), Path(args.out), cfg, show=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("lines", "valid", "invalid", "predictions", "alerts")}))
    return 0


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.replay import train_from_file

    version = train_from_file(settings, Path(args.input), Path(args.out), cell=args.cell,
                              hidden_size=args.hidden_size, epochs=args.epochs, show=not args.quiet)
    print(json.dumps({"model": args.out, "version": version}))
    return 0


def _cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    if args.benchmark == "irregular":
        from pipeline.irregular import IRREGULAR_EPOCHS, evaluate_irregular, format_irregular

        irr = evaluate_irregular(settings, epochs=args.epochs or IRREGULAR_EPOCHS, hidden_size=args.hidden_size,
                                 seeds=args.seeds, peers=not args.no_peers, objectives=(args.objective,),
                                 stream_names=tuple(args.streams.split(",")),
                                 sim_train_devices=args.sim_train_devices)
        print(format_irregular(irr))
        if args.json:
            print(json.dumps(irr))
        return 0
    from pipeline.evaluate import evaluate_skab, format_table

    if not args.data_dir:
        print("liquidstream evaluate skab: --data-dir is required (SKAB's data/ folder)", file=sys.stderr)
        return 2
    report = evaluate_skab(settings, Path(args.data_dir), epochs=args.epochs or 20, cell=args.cell,
                           hidden_size=args.hidden_size, peers=not args.no_peers, profile=args.profile)
    print(format_table(report))
    if args.json:
        print(json.dumps(report))
    return 0


def _model_flags(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--cell", choices=["cfc", "ltc", "liquid"], default="cfc")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    device_flag(p)


# --- argparse value types shared by the sub-command modules ----------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be >= 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        msg = f"must be a TCP port 0..65535 (0 = any free one), got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        msg = f"must be >= 0, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="compute device (default: LIQUIDSTREAM_DEVICE or auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liquidstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Handler] = {}

    p = sub.add_parser("demo", help="simulate a fleet, train, stream and score it (no broker)")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--duration-s", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=7)
    _model_flags(p, epochs=8)
    handlers["demo"] = _cmd_demo

    p = sub.add_parser("replay", help="stream a JSONL file of readings through the operator")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--train-fraction", type=float, default=0.0)
    _model_flags(p, epochs=8)
    handlers["replay"] = _cmd_replay

    p = sub.add_parser("train", help="train a forecaster offline on a JSONL file of readings")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    _model_flags(p, epochs=8)
    handlers["train"] = _cmd_train

    p = sub.add_parser("evaluate", help="accuracy: SKAB next to published baselines, or the irregular-sampling "
                                        "study (docs/evaluation.md)")
    p.add_argument("benchmark", choices=["skab", "irregular"])
    p.add_argument("--data-dir", default=None, help="skab: SKAB's data/ folder (e.g. ../shared/data/skab/data)")
    p.add_argument("--json", action="store_true", help="end with one JSON line (skab: holding f1, far, mar)")
    p.add_argument("--no-peers", action="store_true", help="skip the River peers")
    p.add_argument("--profile", choices=["skab", "settings"], default="skab",
                   help="skab: operator settings of pipeline.evaluate.SKAB_PROFILE on top of LIQUIDSTREAM_OPERATOR__*")
    p.add_argument("--seeds", type=int, default=2, help="irregular: seeds per model")
    p.add_argument("--objective", choices=["mse", "nll", "beta-nll"], default="mse",
                   help="irregular: train the mean only (mse, unit spread), mean and spread (nll, production) "
                        "or mean and spread with the mean's gradient of squared error (beta-nll)")
    p.add_argument("--streams", default="co2,elnino,waterflow,simulator",
                   help="irregular: comma-separated streams among co2, elnino, waterflow, simulator, sines (control)")
    p.add_argument("--sim-train-devices", type=positive_int, default=96,
                   help="irregular: simulated devices the simulator stream's models train on (32 others are held out)")
    _model_flags(p, epochs=20)
    p.set_defaults(epochs=None)  # per benchmark: skab 20, irregular IRREGULAR_EPOCHS
    handlers["evaluate"] = _cmd_evaluate

    for name, register in _EXTRA_COMMANDS:
        handlers[name] = register(sub)
    parser.set_defaults(_handlers=handlers)
    return parser


def _extra_commands() -> list[tuple[str, Callable[[Any], Handler]]]:
    """Sub-commands that live in their own modules (the Kafka worker and friends)."""
    from pipeline import cli_kafka, cli_ops

    return [*cli_kafka.COMMANDS, *cli_ops.COMMANDS]


#: Sub-commands that never run a model: they skip importing torch at start-up.
_NO_TORCH = frozenset({"simulate", "report"})
_EXTRA_COMMANDS: list[tuple[str, Callable[[Any], Handler]]] = []


def main(argv: Sequence[str] | None = None) -> int:
    _EXTRA_COMMANDS[:] = _extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except pydantic.ValidationError as ex:
        # A bad LIQUIDSTREAM_* value: say which, without a traceback.
        print(f"liquidstream {args.command}: invalid settings: {ex}", file=sys.stderr)
        return 2
    try:
        if args.command not in _NO_TORCH:
            settings.configure_torch()
        handler: Handler = args._handlers[args.command]
        return handler(args, settings)
    except LiquidStreamError as ex:
        print(f"liquidstream {args.command}: error: {ex}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
