"""Turning a :class:`~operators.result.StepResult` into output records (predictions and alerts).

One function per record kind, shared by the Kafka worker, the faust app, file replay and the demo, so every
path publishes the same fields (see :mod:`pipeline.schemas` for the contract).  Non-finite numbers never
reach the wire: a score that does not exist (a device's first reading) is ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from operators.result import EventStatus, StepResult

#: (topic, partition, offset) of the input message behind an event; None outside Kafka.
SourceCoords = tuple[str, int, int]


def _finite_or_none(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def channel_label(names: Sequence[str] | None, index: int) -> str:
    """Name of channel ``index``: the reading's own name when it sent names, else ``ch<index>``."""
    if names is not None and index < len(names):
        return names[index]
    return f"ch{index}"


def prediction_records(device_ids: Sequence[str], result: StepResult, model_version: str,
                       sources: Sequence[SourceCoords] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(event position, record)`` for every applied event, in input order.

    Dropped events (late or duplicate under the ``drop`` policies) have no prediction; callers report them
    (dead-letter topic, or the replay's invalid list) so that nothing disappears silently.
    """
    applied = np.flatnonzero(result.applied)
    forecast = result.forecast[applied].tolist()
    std = result.forecast_std[applied].tolist()
    fts = result.forecast_ts_ms[applied].tolist()
    out = []
    for j, i in enumerate(applied.tolist()):
        status = EventStatus(int(result.status[i])).label
        if result.long_gap[i]:
            status = f"{status}+long_gap"
        rec: dict[str, Any] = {
            "device_id": device_ids[i], "ts": int(result.ts_ms[i]), "forecast": forecast[j],
            "forecast_std": std[j], "forecast_ts": fts[j], "horizon_s": float(result.horizon_s[i]),
            "score": _finite_or_none(float(result.score[i])),
            "threshold": _finite_or_none(float(result.threshold[i])),
            "is_alert": bool(result.is_alert[i]), "status": status, "model_version": model_version,
        }
        if sources is not None:
            topic, partition, offset = sources[i]
            rec["source"] = {"topic": topic, "partition": partition, "offset": offset}
        out.append((i, rec))
    return out


def alert_records(result: StepResult, model_version: str, sources: Sequence[SourceCoords] | None = None,
                  channel_names: Sequence[Sequence[str] | None] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(event position, record)`` for every alert opened in this result."""
    out = []
    for alert in result.alerts:
        names = channel_names[alert.index] if channel_names is not None else None
        rec: dict[str, Any] = {
            "device_id": alert.device_id, "ts": alert.ts_ms, "score": alert.score, "threshold": alert.threshold,
            "severity": alert.severity, "channels": [channel_label(names, c) for c in alert.channels],
            "reason": alert.reason, "model_version": model_version,
        }
        if sources is not None:
            topic, partition, offset = sources[alert.index]
            rec["source"] = {"topic": topic, "partition": partition, "offset": offset}
        out.append((alert.index, rec))
    return out
