"""PNG plots of a few devices: readings, forecast mean and +-2 std band, alerts and ground-truth incidents.

Uses matplotlib's object API with an explicit Agg canvas, so importing this module neither imports
``pyplot`` nor changes the process-wide backend.  Input files are the JSON-lines the worker and the
simulator write; every ``ts`` is epoch milliseconds.  Plots show seconds since the first plotted reading.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray

from liquidstream.operators.errors import ConfigError, InputError
from liquidstream.pipeline.wire.codec import DecodedBatch

StrPath = str | PathLike[str]


def _as_2d(name: str, device_id: str, array: Any, rows: int) -> NDArray[np.float64]:
    out = np.asarray(array, dtype=np.float64)
    out = out[:, None] if out.ndim == 1 else out  # [rows] -> [rows, 1]
    if out.ndim != 2 or out.shape[0] != rows:
        msg = f"{device_id}: {name} must have {rows} rows, got shape {np.shape(array)}"
        raise InputError(msg)
    return out


@dataclass
class DeviceSeries:
    """Everything plotted for one device.  ``*ts_ms`` are epoch ms; value arrays are ``[rows, channels]``."""

    device_id: str
    ts_ms: NDArray[np.int64]  # [n] reading times
    values: NDArray[np.float64]  # [n, C]
    forecast_ts_ms: NDArray[np.int64]  # [m] times the forecasts are *for*
    forecast: NDArray[np.float64]  # [m, C] predicted mean
    forecast_std: NDArray[np.float64]  # [m, C] predicted std
    alert_ts_ms: NDArray[np.int64]  # [k]
    incidents: Sequence[tuple[int, int]] = field(default=())  # (start_ms, end_ms) ground-truth windows

    def __post_init__(self) -> None:
        self.ts_ms = np.asarray(self.ts_ms, dtype=np.int64).reshape(-1)
        self.forecast_ts_ms = np.asarray(self.forecast_ts_ms, dtype=np.int64).reshape(-1)
        self.alert_ts_ms = np.asarray(self.alert_ts_ms, dtype=np.int64).reshape(-1)
        self.values = _as_2d("values", self.device_id, self.values, len(self.ts_ms))
        self.forecast = _as_2d("forecast", self.device_id, self.forecast, len(self.forecast_ts_ms))
        m = len(self.forecast_ts_ms)
        self.forecast_std = _as_2d("forecast_std", self.device_id, self.forecast_std, m)
        if self.forecast.shape != self.forecast_std.shape:
            shapes = f"{self.forecast.shape} != {self.forecast_std.shape}"
            msg = f"{self.device_id}: forecast and forecast_std shapes differ: {shapes}"
            raise InputError(msg)
        self.incidents = tuple((int(a), int(b)) for a, b in self.incidents)


def _read_jsonl(path: StrPath) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                msg = f"{path}:{number}: not JSON ({exc.msg})"
                raise InputError(msg) from exc
            if not isinstance(row, dict) or not isinstance(row.get("device_id"), str):
                msg = f"{path}:{number}: expected an object with a string device_id"
                raise InputError(msg)
            yield number, row


def device_ids_of(path: StrPath) -> list[str]:
    """The ``device_id`` of every line of a JSON-lines file (repeats kept, file order)."""
    return [row["device_id"] for _, row in _read_jsonl(path)]


def load_series(readings_jsonl: StrPath | DecodedBatch, predictions_jsonl: StrPath | None,
                alerts_jsonl: StrPath | None, device_ids: Iterable[str],
                incidents_jsonl: StrPath | None = None) -> list[DeviceSeries]:
    """Collect the plotted data of ``device_ids`` (in that order) from the worker's / simulator's files.

    Readings: ``{"device_id", "ts", "values"}``, or the readings already decoded by the worker's codec (how
    ``liquidstream report`` reads them: it accepts and skips the same lines as ``replay``); predictions:
    ``{"device_id", "ts", "forecast", "forecast_std"}`` and optionally ``forecast_ts`` (the time the forecast is
    for; ``ts`` if absent);
    alerts: ``{"device_id", "ts"}``; incidents: ``{"device_id", "start_ms", "end_ms"}``.  ``None`` = no file.
    """
    wanted = list(dict.fromkeys(device_ids))
    acc: dict[str, dict[str, list[Any]]] = {d: {k: [] for k in ("r", "p", "a", "i")} for d in wanted}
    if isinstance(readings_jsonl, DecodedBatch):
        columns = readings_jsonl.device_ids, readings_jsonl.ts_ms.tolist(), readings_jsonl.values.tolist()
        for dev, ts, row in zip(*columns, strict=True):
            if dev in acc:
                acc[dev]["r"].append((ts, row))
    sources = (("r", readings_jsonl), ("p", predictions_jsonl), ("a", alerts_jsonl), ("i", incidents_jsonl))
    for key, path in sources:
        if path is None or isinstance(path, DecodedBatch):
            continue
        for number, row in _read_jsonl(path):
            bucket = acc.get(row["device_id"])
            if bucket is None:
                continue
            try:
                if key == "r":
                    item: Any = (int(row["ts"]), [float(v) for v in row["values"]])
                elif key == "p":
                    item = (int(row.get("forecast_ts", row["ts"])), [float(v) for v in row["forecast"]],
                            [float(v) for v in row["forecast_std"]])
                elif key == "a":
                    if row.get("event", "opened") != "opened":
                        continue  # a closed record: the plot marks where alerts open
                    item = int(row["ts"])
                else:
                    item = (int(row["start_ms"]), int(row["end_ms"]))
            except (KeyError, TypeError, ValueError) as exc:
                msg = f"{path}:{number}: missing or malformed field ({exc!r})"
                raise InputError(msg) from exc
            bucket[key].append(item)
    out = []
    for dev in wanted:
        readings, preds = sorted(acc[dev]["r"]), sorted(acc[dev]["p"])
        try:
            out.append(DeviceSeries(
                dev, np.array([r[0] for r in readings], dtype=np.int64), np.array([r[1] for r in readings]),
                np.array([p[0] for p in preds], dtype=np.int64), np.array([p[1] for p in preds]),
                np.array([p[2] for p in preds]), np.array(sorted(acc[dev]["a"]), dtype=np.int64),
                sorted(acc[dev]["i"])))
        except ValueError as exc:  # ragged value lists
            msg = f"{dev}: rows have different channel counts ({exc})"
            raise InputError(msg) from exc
    return out


def pick_devices(device_ids: Iterable[str], alert_device_ids: Iterable[str] = (),
                 incident_device_ids: Iterable[str] = (), n: int = 4) -> list[str]:
    """Up to ``n`` interesting devices, taken in turn from: alerted with an incident (hit), incident without
    alert (miss), alert without incident (false alarm), quiet.  Within a group: most alerts + incidents
    first, then first appearance in ``device_ids``.  Pass each file's ids via ``device_ids_of`` (repeats
    count).
    """
    if n < 1:
        msg = f"n must be >= 1, got {n}"
        raise ConfigError(msg)
    alerts, incidents = Counter(alert_device_ids), Counter(incident_device_ids)
    order = list(dict.fromkeys([*device_ids, *incidents, *alerts]))
    groups: list[list[str]] = [[], [], [], []]
    for dev in sorted(order, key=lambda d: -(alerts[d] + incidents[d])):  # stable: ties keep first appearance
        groups[(0 if alerts[dev] else 1) if incidents[dev] else (2 if alerts[dev] else 3)].append(dev)
    picked: list[str] = []
    while len(picked) < min(n, len(order)):
        for group in groups:
            if group and len(picked) < n:
                picked.append(group.pop(0))
    return picked


def _breaks(t_s: NDArray[np.float64], *ys: NDArray[np.float64]) -> list[NDArray[np.float64]]:
    """Insert NaN after gaps much longer than usual so lines do not bridge dropouts."""
    if len(t_s) < 3:
        return [t_s, *ys]
    dt = np.diff(t_s)
    cut = np.flatnonzero(dt > max(20.0, 10.0 * float(np.median(dt)))) + 1  # s
    return [np.insert(a, cut, np.nan) for a in (t_s, *ys)]


def _draw(ax: Axes, s: DeviceSeries, ch: int, t0_ms: int, min_span_s: float) -> None:
    for start, end in s.incidents:
        a, b = (start - t0_ms) / 1000.0, (end - t0_ms) / 1000.0
        mid, half = (a + b) / 2.0, max(b - a, min_span_s) / 2.0
        ax.axvspan(mid - half, mid + half, color="orange", alpha=0.3, lw=0, label="incident (truth)")
    for ts in s.alert_ts_ms:
        ax.axvline((ts - t0_ms) / 1000.0, color="red", lw=1.0, alpha=0.8, label="alert")
    if s.forecast.shape[1] > ch:
        t, mean, std = _breaks((s.forecast_ts_ms - t0_ms) / 1000.0, s.forecast[:, ch], s.forecast_std[:, ch])
        ax.fill_between(t, mean - 2 * std, mean + 2 * std, color="tab:green", alpha=0.25, lw=0,
                        label="forecast ±2 std")
        ax.plot(t, mean, color="tab:green", lw=1.0, label="forecast")
    if s.values.shape[1] > ch:
        ax.plot((s.ts_ms - t0_ms) / 1000.0, s.values[:, ch], ".", ms=2.5, color="tab:blue", label="reading")
    ax.set_title(f"{s.device_id} · channel {ch}", fontsize=9, loc="left")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def plot_devices(out_path: StrPath, series: Sequence[DeviceSeries], title: str | None = None,
                 max_channels: int = 2) -> Path:
    """Write a PNG with one row per device and one column per channel (the first ``max_channels``)."""
    if not series or max_channels < 1:
        msg = f"need >= 1 series and max_channels >= 1, got {len(series)} and {max_channels}"
        raise ConfigError(msg)
    cols = max(1, min(max_channels, max(max(s.values.shape[1], s.forecast.shape[1]) for s in series)))
    all_ts = [a for s in series for a in (s.ts_ms, s.forecast_ts_ms) if len(a)]
    t0_ms = min(int(a.min()) for a in all_ts) if all_ts else 0
    t1_ms = max(int(a.max()) for a in all_ts) if all_ts else 1000
    height_in = 2.3 * len(series) + 1.0  # fixed margins: constrained layout would double the drawing time
    fig = Figure(figsize=(7.0 * cols, height_in))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), cols, sharex=True, squeeze=False)
    fig.subplots_adjust(left=0.07 / cols, right=1 - 0.02 / cols, top=1 - 0.6 / height_in,
                        bottom=0.45 / height_in, hspace=0.38, wspace=0.12)
    for row, s in enumerate(series):
        for ch in range(cols):
            _draw(axes[row][ch], s, ch, t0_ms, min_span_s=0.004 * (t1_ms - t0_ms) / 1000.0)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since first reading", fontsize=9)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper right", ncols=len(handles),
                   fontsize=8, frameon=False, bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=11, x=0.01, y=1 - 0.12 / height_in, ha="left", va="top")
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
