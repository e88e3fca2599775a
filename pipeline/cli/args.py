"""What the sub-command modules share: the handler type and argparse value types and flag groups.

The bottom of :mod:`liquidstream.pipeline.cli`: every command module imports this one and nothing else of the
package, so the command table in :mod:`~liquidstream.pipeline.cli.entry` has no cycle to break.

>>> positive_int("3"), port("0"), non_negative_float("0.5"), fraction("0.3")
(3, 0, 0.5, 0.3)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.settings import Settings

__all__ = ["Command", "DefaultsFormatter", "Handler", "commissioning_flag", "device_flag", "fraction", "kafka_flags",
           "mapping_flags", "model_flags", "non_negative_float", "non_negative_int", "port", "positive_float",
           "positive_int", "require_extra", "with_commissioning"]

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


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:  # also rejects NaN
        msg = f"must be a fraction in [0, 1], got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects NaN
        msg = f"must be > 0, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        msg = f"must be >= 0, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends with each flag's default: the flag's own, or for a flag that defaults to a setting's
    environment variable, that variable and the setting's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.nargs == 0 or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        field = Settings.model_fields.get(action.dest)
        if action.default is None and field is not None:
            default = field.get_default(call_default_factory=True)
            shown = "none" if default is None else default
            return f"{text} (default: LIQUIDSTREAM_{action.dest.upper()}, else {shown})"
        return f"{text} (default: %(default)s)"


def device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="compute device; auto = the GPU when PyTorch sees one")


def model_flags(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--cell", choices=["cfc", "ltc", "liquid"], default="cfc",
                   help="cell of a model trained here: closed-form (cfc), liquid time-constant (ltc) or liquid")
    p.add_argument("--hidden-size", type=positive_int, default=32, help="hidden units of a model trained here")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs of a model trained here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    device_flag(p)


def mapping_flags(p: argparse.ArgumentParser) -> None:
    """The input mapping (``Settings.mapping``): flags override ``LIQUIDSTREAM_MAPPING__*``."""
    g = p.add_argument_group("input mapping", "read another JSON shape as readings (docs/operations.md, "
                                              "'Input mapping'); each flag overrides LIQUIDSTREAM_MAPPING__<NAME>")
    g.add_argument("--shape", dest="mapping_shape", choices=["reading", "wide", "long"], default=None,
                   help="reading: {device_id, ts, values}; wide: one field per channel; long: one message per "
                        "channel reading (default: reading)")
    g.add_argument("--device-field", dest="mapping_device_field", default=None, metavar="FIELD",
                   help="field holding the device id, or @key for the message key (default: device_id)")
    g.add_argument("--time-field", dest="mapping_time_field", default=None, metavar="FIELD",
                   help="field holding the event time (default: ts)")
    g.add_argument("--time-unit", dest="mapping_time_unit", choices=["ms", "s", "iso8601"], default=None,
                   help="epoch ms (integer), epoch s, or ISO 8601 with zone (default: ms)")
    g.add_argument("--channel-fields", dest="mapping_channel_fields", default=None, metavar="A,B,...",
                   type=lambda text: tuple(f.strip() for f in text.split(",") if f.strip()),
                   help="wide: the channel fields, long: the channel names, in the model's order (default: none)")
    g.add_argument("--channel-field", dest="mapping_channel_field", default=None, metavar="FIELD",
                   help="long: field naming the channel (default: channel)")
    g.add_argument("--value-field", dest="mapping_value_field", default=None, metavar="FIELD",
                   help="long: field holding the value (default: value)")
    g.add_argument("--assembly-window", dest="mapping_assembly_window_s", default=None, metavar="SECONDS",
                   type=positive_float, help="long, from a topic: seconds of a device's event time after which "
                   "its unfinished reading is dead-lettered 'incomplete' (default: 60)")


def commissioning_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--commissioning", type=non_negative_int, default=None, metavar="N",
                   help="the first N readings of every device are normal commissioning data: no alert opens "
                        "during them and the device's statistics learn from all of them "
                        "(default: LIQUIDSTREAM_OPERATOR__COMMISSIONING_EVENTS, else 0)")


def with_commissioning(args: argparse.Namespace, settings: Settings) -> Settings:
    """``settings`` with ``--commissioning`` applied to the operator's, when given."""
    if getattr(args, "commissioning", None) is None:
        return settings
    operator = dataclasses.replace(settings.operator, commissioning_events=args.commissioning)
    return settings.model_copy(update={"operator": operator})


def kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers, host:port[,host:port]")


def require_extra(module: str, extra: str, what: str) -> None:
    """A clear error when an optional dependency (a package extra) is not installed: the worker needs none."""
    if importlib.util.find_spec(module) is None:
        msg = f"{what} needs {module}, which is not installed: pip install 'liquidstream[{extra}]'"
        raise ConfigurationError(msg)
