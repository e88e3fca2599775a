"""Turning a :class:`~liquidstream.operators.result.StepResult` into output records (predictions and alerts).

One function per record kind, shared by the Kafka worker, the faust app, file replay and the demo, so every path
publishes the same fields (see :mod:`liquidstream.pipeline.wire.schemas` for the contract).  Non-finite numbers never
reach the wire: a score that does not exist (a device's first reading) is ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from liquidstream.operators.result import Alert, AlertClosed, EventStatus, StepResult
from liquidstream.pipeline.wire.types import SourceCoords

#: (topic, partition, offset) of the input message behind an event; None outside Kafka.


def channel_label(names: Sequence[str] | None, index: int) -> str:
    """Name of channel ``index``: the reading's own name when it sent names, else ``ch<index>``."""
    if names is not None and index < len(names):
        return names[index]
    return f"ch{index}"


#: EventStatus value -> its label, for vectorised lookups.
_LABELS = np.array([EventStatus(v).label for v in range(len(EventStatus))], dtype=object)


def _floats_or_none(values: np.ndarray) -> list[float | None]:
    """Python floats, ``None`` where not finite (first readings have no score)."""
    out: np.ndarray = values.astype(np.float64).astype(object)
    out[~np.isfinite(values)] = None
    return out.tolist()  # type: ignore[no-any-return]


def prediction_records(device_ids: Sequence[str], result: StepResult, model_version: str,
                       sources: Sequence[SourceCoords] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(event position, record)`` for every applied event, in input order.

    Dropped events (late or duplicate under the ``drop`` policies) have no prediction; callers report them
    (dead-letter topic, or the replay's invalid list) so that nothing disappears silently.  The columns
    are converted once per batch (labels, ``None`` scores, Python numbers); only the dicts are per event.
    """
    applied = np.flatnonzero(result.applied)
    labels = _LABELS[result.status[applied]]
    gap = result.long_gap[applied]
    if gap.any():
        labels[gap] = labels[gap] + "+long_gap"
    columns = zip(applied.tolist(), result.ts_ms[applied].tolist(), result.forecast[applied].tolist(),
                  result.forecast_std[applied].tolist(), result.forecast_ts_ms[applied].tolist(),
                  result.horizon_s[applied].tolist(), _floats_or_none(result.score[applied]),
                  _floats_or_none(result.anomaly_score[applied]), _floats_or_none(result.threshold[applied]),
                  result.is_alert[applied].tolist(), labels.tolist(), strict=True)
    out = []
    for i, ts, forecast, std, fts, horizon, score, anomaly, thr, is_alert, status in columns:
        rec: dict[str, Any] = {
            "device_id": device_ids[i], "ts": ts, "forecast": forecast, "forecast_std": std, "forecast_ts": fts,
            "horizon_s": horizon, "score": score, "anomaly_score": anomaly, "threshold": thr, "is_alert": is_alert,
            "status": status, "model_version": model_version,
        }
        if sources is not None:
            topic, partition, offset = sources[i]
            rec["source"] = {"topic": topic, "partition": partition, "offset": offset}
        out.append((i, rec))
    return out


def _json_numbers(values: np.ndarray) -> list[bytes]:
    """JSON texts of the rows (2-D: ``a,b,c`` without brackets) or items (1-D) of a float array, NaN/Inf
    as ``null``, in one orjson call: the same shortest round-trip digits as ``json.dumps`` of each float."""
    if values.shape[0] == 0:
        return []
    text: bytes = orjson.dumps(values.astype(np.float64), option=orjson.OPT_SERIALIZE_NUMPY)
    return text[2:-2].split(b"],[") if values.ndim == 2 else text[1:-1].split(b",")


_PREDICTION = (b'{"device_id":%b,"ts":%d,"forecast":[%b],"forecast_std":[%b],"forecast_ts":%d,"horizon_s":%b,'
               b'"score":%b,"anomaly_score":%b,"threshold":%b,"is_alert":%b,"status":"%b","model_version":%b')
_SOURCE = b',"source":{"topic":%b,"partition":%d,"offset":%d}}'
_WITH_SOURCE = _PREDICTION + _SOURCE  # one formatting per record, not a format and a concatenation


def encode_predictions(device_ids: Sequence[str], result: StepResult, model_version: str,
                       sources: Sequence[SourceCoords] | None = None) -> list[tuple[int, bytes | None]]:
    """``(event position, JSON bytes)`` of :func:`prediction_records`, built columnar: numbers formatted
    for the whole batch in a few orjson calls, then one bytes template per event.  ``None`` instead of bytes
    for an event whose forecast is not finite (encode its record with the checking encoder: it raises).

    >>> from liquidstream.operators.result import StepResult
    >>> res = StepResult(np.array([1, 2], np.int8), np.zeros(2, bool), np.ones((2, 1), np.float32),
    ...                  np.ones((2, 1), np.float32), np.ones(2, np.float32), np.array([np.nan, 1], np.float32),
    ...                  np.full(2, 4.0, np.float32), np.zeros(2, bool), np.array([1000, 1000]),
    ...                  anomaly_score=np.array([np.nan, 0.2], np.float32))
    >>> import json
    >>> [(i, json.loads(v)["score"], json.loads(v)["status"]) for i, v in encode_predictions(["a", "a"], res, "v1")]
    [(0, None, 'first')]
    """
    applied = np.flatnonzero(result.applied)
    forecast, std, horizon = result.forecast[applied], result.forecast_std[applied], result.horizon_s[applied]
    finite = (np.isfinite(forecast).all(axis=1) & np.isfinite(std).all(axis=1) & np.isfinite(horizon)).tolist()
    labels = _LABELS[result.status[applied]]
    gap = result.long_gap[applied]
    if gap.any():
        labels[gap] = labels[gap] + "+long_gap"
    ids: dict[str, bytes] = {}
    version = orjson.dumps(model_version)
    topics: dict[str, bytes] = {}
    columns = zip(applied.tolist(), result.ts_ms[applied].tolist(), _json_numbers(forecast), _json_numbers(std),
                  result.forecast_ts_ms[applied].tolist(), _json_numbers(horizon),
                  _json_numbers(result.score[applied]), _json_numbers(result.anomaly_score[applied]),
                  _json_numbers(result.threshold[applied]), result.is_alert[applied].tolist(),
                  [label.encode() for label in labels.tolist()], finite, strict=True)
    out: list[tuple[int, bytes | None]] = []
    for i, ts, fc, sd, fts, hz, score, anomaly, thr, is_alert, status, ok in columns:
        if not ok:
            out.append((i, None))
            continue
        device = device_ids[i]
        did = ids.get(device)
        if did is None:
            try:
                did = ids[device] = orjson.dumps(device)
            except TypeError:  # a lone surrogate: only the checking encoder words that error
                out.append((i, None))
                continue
        alert = b"true" if is_alert else b"false"
        if sources is None:
            out.append((i, _PREDICTION % (did, ts, fc, sd, fts, hz, score, anomaly, thr, alert, status, version)
                        + b"}"))
            continue
        topic, partition, offset = sources[i]
        tj = topics.get(topic)
        if tj is None:
            tj = topics[topic] = orjson.dumps(topic)
        out.append((i, _WITH_SOURCE % (did, ts, fc, sd, fts, hz, score, anomaly, thr, alert, status, version, tj,
                                       partition, offset)))
    return out


def opened_record(alert: Alert, model_version: str, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``opened`` alert record of ``alert`` (its ``source`` is the caller's to add)."""
    rec: dict[str, Any] = {
        "event": "opened", "alert_id": alert.alert_id, "device_id": alert.device_id, "ts": alert.ts_ms,
        "score": alert.score, "threshold": alert.threshold, "severity": alert.severity,
        "channels": [channel_label(names, c) for c in alert.channels], "reason": alert.reason,
        "model_version": model_version}
    why = alert.explanation
    if why is not None:
        lo, mid, hi = why.time_constants_s
        rec["explanation"] = {"rule": alert.reason, "time_constants_s": {"min": lo, "median": mid, "max": hi},
                              "channels": [{"channel": channel_label(names, c.channel), "reading": c.reading,
                                            "expected": c.expected, "spread": c.spread,
                                            "z": c.z if math.isfinite(c.z) else None} for c in why.channels]}
    return rec


def closed_record(closed: AlertClosed, model_version: str) -> dict[str, Any]:
    """The ``closed`` alert record of ``closed`` (its ``source`` is the caller's to add)."""
    return {"event": "closed", "alert_id": closed.alert_id, "device_id": closed.device_id, "ts": closed.ts_ms,
            "score": closed.peak_score, "threshold": closed.threshold, "severity": closed.severity, "channels": [],
            "reason": closed.reason, "model_version": model_version, "opened_ts": closed.opened_ms,
            "duration_ms": closed.duration_ms, "readings": closed.readings, "closed_by": closed.closed_by}


def alert_records(result: StepResult, model_version: str, sources: Sequence[SourceCoords] | None = None,
                  channel_names: Sequence[Sequence[str] | None] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(event position, record)`` for every alert opened or closed in this result, in input order (an
    ``opened`` record, then, on a later reading, its ``closed`` record with the same ``alert_id``)."""
    out: list[tuple[int, dict[str, Any]]] = []
    for alert in result.alerts:
        names = channel_names[alert.index] if channel_names is not None else None
        out.append((alert.index, opened_record(alert, model_version, names)))
    out += [(closed.index, closed_record(closed, model_version)) for closed in result.closed]
    out.sort(key=lambda item: item[0])
    if sources is not None:
        for index, rec in out:
            topic, partition, offset = sources[index]
            rec["source"] = {"topic": topic, "partition": partition, "offset": offset}
    return out
