"""The ``liquidstream`` command line: one sub-command per job, settings built once and passed down.

Flags override ``LIQUIDSTREAM_*`` environment variables; a flag left out keeps the environment's value.  A user
error (a bad flag or setting, a missing or unreadable file, a model that is not one, no valid input) ends the
command with one line naming the problem and its fix on stderr, and exit status 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import pydantic

from liquidstream.operators.errors import LiquidStreamError
from liquidstream.pipeline.cli import export, kafka, offline, ops, reference, train
from liquidstream.pipeline.cli.args import Command, DefaultsFormatter, Handler
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.settings_doc import unknown_variables

__all__ = ["COMMANDS", "build_parser", "main", "version"]

#: Every sub-command, in ``--help`` order: one explicit table, built from each module's own list.
COMMANDS: tuple[Command, ...] = (*offline.COMMANDS, *kafka.COMMANDS, *train.COMMANDS, *export.COMMANDS,
                                 *ops.COMMANDS, *reference.COMMANDS)
#: Sub-commands that never run a model: they skip configuring torch at start-up.
_NO_TORCH = frozenset({"simulate", "report", "schema", "settings"})
_MAPPING = "mapping_"  # flags of the input mapping: dest mapping_<field of InputMapping>


def version() -> str:
    """The installed distribution's version (``liquidstream --version``)."""
    try:
        return metadata.version("liquidstream")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _settings(args: argparse.Namespace) -> Settings:
    """Environment first, then every flag that maps to a settings field and was given."""
    fields = Settings.model_fields
    given = {k: v for k, v in vars(args).items() if v is not None}
    overrides: dict[str, Any] = {k: v for k, v in given.items() if k in fields}
    mapping = {k[len(_MAPPING):]: v for k, v in given.items() if k.startswith(_MAPPING)}
    if mapping:
        overrides["mapping"] = mapping  # merged field by field with LIQUIDSTREAM_MAPPING__*
    return Settings(**overrides)


def _one_line(ex: pydantic.ValidationError) -> str:
    """A settings validation error as one line: each bad setting's variable, problem and value."""
    parts = []
    for err in ex.errors():
        name = "LIQUIDSTREAM_" + "__".join(str(p).upper() for p in err["loc"]) if err["loc"] else "settings"
        text = err["msg"].removeprefix("Value error, ")
        parts.append(f"{name}: {text} (got {str(err.get('input'))[:60]!r})")
    return "; ".join(parts)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The parser with ``commands`` registered (all of them by default)."""
    parser = argparse.ArgumentParser(prog="liquidstream", description=__doc__, formatter_class=DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"liquidstream {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {name: register(sub) for name, register in commands}
    for p in sub.choices.values():
        p.formatter_class = DefaultsFormatter  # every flag's help ends with its default
    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    where = f"liquidstream {args.command}"
    for warning in unknown_variables(os.environ):
        print(f"{where}: warning: {warning}", file=sys.stderr)
    try:
        settings = _settings(args)
    except pydantic.ValidationError as ex:  # a bad LIQUIDSTREAM_* value or flag: say which, without a traceback
        print(f"{where}: invalid settings: {_one_line(ex)}", file=sys.stderr)
        return 2
    except LiquidStreamError as ex:  # a nested settings object's own check (OperatorSettings)
        print(f"{where}: invalid settings: {ex}", file=sys.stderr)
        return 2
    try:
        if args.command not in _NO_TORCH:
            settings.configure_torch()
        handler: Handler = args._handlers[args.command]
        return handler(args, settings)
    except LiquidStreamError as ex:
        print(f"{where}: error: {ex}", file=sys.stderr)
        return 2
    except OSError as ex:  # a file the user named cannot be read or written
        print(f"{where}: error: {ex.strerror or ex}: {ex.filename or ''} (check the path and its permissions)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
