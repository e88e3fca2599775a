"""What the sub-command modules share: the handler type and argparse value types and flag groups.

The bottom of :mod:`liquidstream.pipeline.cli`: every command module imports this one and nothing else of the
package, so the command table in :mod:`~liquidstream.pipeline.cli.entry` has no cycle to break.

>>> positive_int("3"), port("0"), non_negative_float("0.5")
(3, 0, 0.5)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from liquidstream.pipeline.settings import Settings

__all__ = ["Command", "Handler", "commissioning_flag", "device_flag", "kafka_flags", "model_flags",
           "non_negative_float", "non_negative_int", "port", "positive_int", "with_commissioning"]

Handler = Callable[[argparse.Namespace, Settings], int]
#: ``(name, register)``: ``register(subparsers)`` adds the sub-command and returns its handler.
Command = tuple[str, Callable[[Any], Handler]]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be >= 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        msg = f"must be >= 0, got {value}"
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


def model_flags(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--cell", choices=["cfc", "ltc", "liquid"], default="cfc")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    device_flag(p)


def commissioning_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--commissioning", type=non_negative_int, default=None, metavar="N",
                   help="the first N readings of every device are normal commissioning data: no alert opens "
                        "during them and the device's statistics learn from all of them "
                        "(LIQUIDSTREAM_OPERATOR__COMMISSIONING_EVENTS)")


def with_commissioning(args: argparse.Namespace, settings: Settings) -> Settings:
    """``settings`` with ``--commissioning`` applied to the operator's, when given."""
    if getattr(args, "commissioning", None) is None:
        return settings
    operator = dataclasses.replace(settings.operator, commissioning_events=args.commissioning)
    return settings.model_copy(update={"operator": operator})


def kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (LIQUIDSTREAM_BOOTSTRAP)")
