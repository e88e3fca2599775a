"""The reference sub-commands of ``liquidstream``: ``schema`` (the published JSON Schemas of the records it reads
and writes) and ``settings`` (every setting with its variable, type, default, unit and meaning, as Markdown).

Both print exactly what ``docs/schemas/<name>.json`` and ``docs/settings.md`` hold (tests keep the files equal to
this output), so a deployed worker can always say which contract it follows.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from liquidstream.pipeline.cli.args import Command, Handler
from liquidstream.pipeline.settings import Settings

__all__ = ["COMMANDS", "schema_text"]

#: The record kinds ``schema`` knows, in the order of their path through the worker.
KINDS = ("reading", "prediction", "alert", "dead-letter")


def schema_text(name: str) -> str:
    """The published JSON Schema of ``name``, as written to ``docs/schemas/<name>.json``.

    >>> doc = json.loads(schema_text("alert"))
    >>> doc["$id"], doc["required"][:3]
    ('urn:liquidstream:schema:alert:2', ['event', 'alert_id', 'device_id'])
    """
    from liquidstream.pipeline.wire.contract import json_schema

    return json.dumps(json_schema(name), indent=2, sort_keys=False) + "\n"


def register_schema(sub: Any) -> Handler:
    p = sub.add_parser("schema", help="print the JSON Schema of a record liquidstream reads or writes "
                                      "(also in docs/schemas/)")
    p.add_argument("name", choices=KINDS, help="reading: the input; prediction, alert: the outputs; dead-letter: "
                                               "a rejected input's ls.* headers (Kafka) or invalid.jsonl line")
    return _cmd_schema


def _cmd_schema(args: argparse.Namespace, _settings: Settings) -> int:
    print(schema_text(args.name), end="")
    return 0


def register_settings(sub: Any) -> Handler:
    sub.add_parser("settings", help="print every setting (LIQUIDSTREAM_* variable, type, default, unit, meaning) as "
                                    "Markdown (also docs/settings.md)")
    return _cmd_settings


def _cmd_settings(_args: argparse.Namespace, _settings: Settings) -> int:
    from liquidstream.pipeline.settings_doc import settings_markdown

    print(settings_markdown(), end="")
    return 0


COMMANDS: list[Command] = [
    ("schema", register_schema),
    ("settings", register_settings),
]
