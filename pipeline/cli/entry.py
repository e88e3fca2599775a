"""The ``liquidstream`` command line: one sub-command per job, settings built once and passed down.

Flags override ``LIQUIDSTREAM_*`` environment variables; a flag left out keeps the environment's value.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pydantic

from liquidstream.operators.errors import LiquidStreamError
from liquidstream.pipeline.cli import kafka, offline, ops, train
from liquidstream.pipeline.cli.args import Command, Handler
from liquidstream.pipeline.settings import Settings

__all__ = ["COMMANDS", "build_parser", "main"]

#: Every sub-command, in ``--help`` order: one explicit table, built from each module's own list.
COMMANDS: tuple[Command, ...] = (*offline.COMMANDS, *kafka.COMMANDS, *train.COMMANDS, *ops.COMMANDS)
#: Sub-commands that never run a model: they skip configuring torch at start-up.
_NO_TORCH = frozenset({"simulate", "report"})


def _settings(args: argparse.Namespace) -> Settings:
    """Environment first, then every flag that maps to a settings field and was given."""
    fields = Settings.model_fields
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return Settings(**overrides)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The parser with ``commands`` registered (all of them by default)."""
    parser = argparse.ArgumentParser(prog="liquidstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Handler] = {name: register(sub) for name, register in commands}
    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
