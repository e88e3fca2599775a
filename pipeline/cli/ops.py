"""Operations sub-commands of ``liquidstream``: ``report`` (a PNG of a few interesting devices).

Registered through :data:`COMMANDS` (``liquidstream.pipeline.cli.entry`` imports it).  ``report`` reads the JSON-lines
files a replay, the demo or a Kafka consumer of the output topics wrote, picks up to ``--devices`` devices (hits,
misses, false alarms, quiet ones: :func:`liquidstream.pipeline.offline.report.pick_devices`) and plots readings,
forecast +-2 std, alerts and, given ``--incidents``, the ground-truth windows.  It never imports torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from liquidstream.pipeline.cli.args import Command, Handler, mapping_flags, positive_int, require_extra
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.settings import Settings

__all__ = ["COMMANDS", "register_report"]

#: Devices plotted by default: four rows keep the PNG readable (one row per device).
DEFAULT_DEVICES = 4


def register_report(sub: Any) -> Handler:
    p = sub.add_parser("report", help="PNG of a few devices: readings, forecasts, alerts, incidents")
    p.add_argument("--readings", required=True, help="readings JSONL, read as `replay` reads it (same input mapping, "
                                                     "same invalid lines skipped)")
    p.add_argument("--predictions", required=True, help="predictions JSONL written by replay/run/demo")
    p.add_argument("--alerts", required=True, help="alerts JSONL written by replay/run/demo")
    p.add_argument("--incidents", default=None, help="ground-truth incidents JSONL (simulate --truth)")
    p.add_argument("--out", default="report.png", help="PNG to write (default report.png)")
    p.add_argument("--devices", type=positive_int, default=DEFAULT_DEVICES,
                   help=f"devices to plot, most interesting first (default {DEFAULT_DEVICES})")
    p.add_argument("--plot-channels", "--channels", dest="plot_channels", type=positive_int, default=2,
                   help="channels plotted per device, one column each (--channels: the old name)")
    p.add_argument("--title", default=None, help="title of the figure (default: devices and alerts counted)")
    mapping_flags(p)
    return _cmd_report


def _existing(flag: str, value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        msg = f"{flag} {value}: no such file"
        raise ConfigurationError(msg)
    return path


def _cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("matplotlib", "plot", "`liquidstream report`")
    from liquidstream.pipeline.offline.readings import read_jsonl
    from liquidstream.pipeline.offline.report import device_ids_of, load_series, pick_devices, plot_devices

    batch, _, _ = read_jsonl(Path(args.readings), settings, None, "--readings")
    predictions = _existing("--predictions", args.predictions)
    alerts = _existing("--alerts", args.alerts)
    incidents = _existing("--incidents", args.incidents) if args.incidents is not None else None
    reading_ids = batch.device_ids
    if not reading_ids:
        first = f" (line {batch.rejects[0].index + 1}: {batch.rejects[0].detail})" if batch.rejects else ""
        msg = f"--readings {args.readings}: no valid reading to plot{first}"
        raise ConfigurationError(msg)
    alert_ids = device_ids_of(alerts)
    incident_ids = device_ids_of(incidents) if incidents is not None else []
    devices = pick_devices(reading_ids, alert_ids, incident_ids, n=args.devices)
    series = load_series(batch, predictions, alerts, devices, incidents)
    title = args.title or f"liquidstream report: {len(devices)} device(s), {len(alert_ids)} alert(s) in total"
    out = plot_devices(args.out, series, title=title, max_channels=args.plot_channels)
    print(json.dumps({"out": str(out), "devices": devices, "alerts": len(alert_ids), "incidents": len(incident_ids),
                      "skipped_readings": len(batch.rejects)}), flush=True)
    return 0


#: ``(name, register)`` pairs; ``register(subparsers)`` adds the sub-command and returns its handler.
COMMANDS: list[Command] = [
    ("report", register_report),
]
