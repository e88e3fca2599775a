"""Tests of the wire models (liquidstream.pipeline.wire.schemas): the documented contract the codec is checked
against."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from liquidstream.operators import AlertReason, Forecaster, LiquidOperator, OperatorSettings
from liquidstream.pipeline.wire.codec import encode_json
from liquidstream.pipeline.wire.contract import AlertRecord, PredictionRecord, Source, json_schema
from liquidstream.pipeline.wire.records import alert_records, encode_predictions, prediction_records
from liquidstream.pipeline.wire.schemas import FLOAT32_OVERFLOW, DeadLetterReason, Reading, reason_for

TS = 1_700_000_000_000  # epoch ms


def _reading(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"device_id": "pump-7", "ts": TS, "values": [1.0, 2.0]}
    base.update(overrides)
    return base


def _reason(obj: Any) -> DeadLetterReason:
    with pytest.raises(ValidationError) as info:
        Reading.model_validate(obj)
    return reason_for(info.value)


def test_valid_reading_converts_ints_and_ignores_extras() -> None:
    r = Reading.model_validate(_reading(values=[1, 2.5, -3], extra={"x": [1]}, firmware="1.2"))
    assert r.values == [1.0, 2.5, -3.0]
    assert all(type(v) is float for v in r.values)
    assert r.channels is None
    assert not hasattr(r, "firmware")


def test_channels_are_kept_when_lengths_match() -> None:
    r = Reading.model_validate(_reading(channels=["temp", "rpm"]))
    assert r.channels == ["temp", "rpm"]
    assert Reading.model_validate(_reading(channels=None)).channels is None


@pytest.mark.parametrize("ts", [1.5, 1.0 * TS, True, False, str(TS), None, [TS]])
def test_ts_must_be_a_strict_int(ts: Any) -> None:
    assert _reason(_reading(ts=ts)) is DeadLetterReason.SCHEMA


def test_ts_accepts_big_ints_limits_are_the_codecs_job() -> None:
    assert Reading.model_validate(_reading(ts=10**30)).ts == 10**30
    assert Reading.model_validate(_reading(ts=-5)).ts == -5


@pytest.mark.parametrize("value", [True, "1.5", None, [1.0], {"v": 1}])
def test_values_reject_non_numbers(value: Any) -> None:
    assert _reason(_reading(values=[1.0, value])) is DeadLetterReason.SCHEMA


@pytest.mark.parametrize("values", [[], "1,2", None, 3.0, {"a": 1.0}])
def test_values_must_be_a_non_empty_list(values: Any) -> None:
    assert _reason(_reading(values=values)) is DeadLetterReason.SCHEMA


def test_values_missing_is_schema() -> None:
    obj = _reading()
    del obj["values"]
    assert _reason(obj) is DeadLetterReason.SCHEMA


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e300, -1e39, FLOAT32_OVERFLOW, 10**400,
                                   2**128 - 2**103 - 1])  # the last int rounds up to the overflow point
def test_values_must_be_finite_in_float32(value: float) -> None:
    assert _reason(_reading(values=[1.0, value])) is DeadLetterReason.NON_FINITE


def test_float32_boundary_is_exact() -> None:
    largest_ok = float(np.nextafter(FLOAT32_OVERFLOW, 0.0))
    r = Reading.model_validate(_reading(values=[largest_ok, -largest_ok]))
    as32 = np.asarray(r.values, dtype=np.float32)
    assert np.isfinite(as32).all()
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(FLOAT32_OVERFLOW))
    assert Reading.model_validate(_reading(values=[1e-300, 5e-324])).values == [1e-300, 5e-324]


def test_non_finite_json_literals_are_non_finite() -> None:
    obj = json.loads('{"device_id": "d", "ts": 1, "values": [NaN, Infinity, -Infinity]}')
    assert _reason(obj) is DeadLetterReason.NON_FINITE


def test_structural_errors_win_over_non_finite() -> None:
    assert _reason(_reading(ts=1.5, values=[math.nan])) is DeadLetterReason.SCHEMA


@pytest.mark.parametrize("device_id", ["", " ", "\t\n", "a" * 257, 7, None, True, "ab\ud800"])
def test_device_id_rules(device_id: Any) -> None:
    assert _reason(_reading(device_id=device_id)) is DeadLetterReason.SCHEMA


def test_device_id_limits_are_characters() -> None:
    assert Reading.model_validate(_reading(device_id="é" * 256)).device_id == "é" * 256
    assert Reading.model_validate(_reading(device_id=" x ")).device_id == " x "


def test_channels_length_mismatch_is_wrong_length() -> None:
    assert _reason(_reading(channels=["a"])) is DeadLetterReason.WRONG_LENGTH
    assert _reason(_reading(channels=[])) is DeadLetterReason.WRONG_LENGTH


@pytest.mark.parametrize("channels", [["a", 1], "ab", {"a": 1}, ["a", None], ["a", "\udfff"]])
def test_channels_type_errors_are_schema(channels: Any) -> None:
    assert _reason(_reading(channels=channels)) is DeadLetterReason.SCHEMA


@pytest.mark.parametrize("obj", [[], 3, "x", None, True, [_reading()]])
def test_non_objects_are_schema(obj: Any) -> None:
    assert _reason(obj) is DeadLetterReason.SCHEMA


def test_reason_values_are_stable() -> None:
    assert [r.value for r in DeadLetterReason] == [
        "empty", "oversize", "undecodable", "malformed_json", "schema", "non_finite", "wrong_length",
        "bad_timestamp", "key_mismatch", "late", "duplicate", "incomplete",
    ]
    assert DeadLetterReason("late") is DeadLetterReason.LATE
    assert f"{DeadLetterReason.NON_FINITE}" == "non_finite"


SOURCE = Source(topic="readings", partition=3, offset=99)


def _prediction(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "device_id": "pump-7", "ts": TS, "forecast": [1.0, 2.0], "forecast_std": [0.1, 0.2],
        "forecast_ts": TS + 1000, "horizon_s": 1.0, "score": None, "anomaly_score": None, "threshold": None,
        "is_alert": False,
        "status": "first", "model_version": "cfc-1", "source": SOURCE,
    }
    base.update(overrides)
    return base


def test_prediction_record_round_trips_through_json() -> None:
    rec = PredictionRecord.model_validate(_prediction(score=2.5, anomaly_score=0.2, threshold=4.0, status="ok"))
    raw = encode_json(rec)
    assert json.loads(raw)["source"] == {"topic": "readings", "partition": 3, "offset": 99}
    assert PredictionRecord.model_validate_json(raw) == rec
    first = PredictionRecord.model_validate(_prediction())
    assert json.loads(encode_json(first))["score"] is None


@pytest.mark.parametrize("bad", [{"score": math.nan}, {"forecast": [1.0, math.inf]},
                                 {"forecast_std": [0.1]}, {"status": ""}, {"horizon_s": -1.0},
                                 {"anomaly_score": 1.5}, {"anomaly_score": -0.1}, {"anomaly_score": math.nan}])
def test_prediction_record_rejects_bad_fields(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PredictionRecord.model_validate(_prediction(**bad))


def test_alert_record() -> None:
    alert = AlertRecord(event="opened", alert_id=f"pump-7@{TS}", device_id="pump-7", ts=TS, score=9.5,
                        threshold=4.0, severity="critical", reason=AlertReason.STUCK_SENSOR, channels=["ch0", "ch2"],
                        model_version="cfc-1", source=SOURCE)
    assert json.loads(encode_json(alert))["reason"] == "stuck_sensor"
    with pytest.raises(ValidationError):
        AlertRecord.model_validate({**alert.model_dump(), "severity": "fatal"})
    with pytest.raises(ValidationError):
        AlertRecord.model_validate({**alert.model_dump(), "reason": "because"})
    closing = {"event": "closed", "ts": TS + 60_000, "channels": [], "opened_ts": TS, "duration_ms": 60_000,
               "readings": 61, "closed_by": "calm"}
    closed = AlertRecord.model_validate({**alert.model_dump(), **closing})
    assert closed.alert_id == alert.alert_id and closed.closed_by == "calm"
    with pytest.raises(ValidationError, match="closed record needs"):
        AlertRecord.model_validate({**alert.model_dump(), "event": "closed"})
    with pytest.raises(ValidationError, match="closed records only"):
        AlertRecord.model_validate({**alert.model_dump(), "readings": 3})


def test_prediction_records_carry_a_calibrated_anomaly_score() -> None:
    """Every applied reading's record has ``anomaly_score`` in [0, 1] (null on a device's first reading), in the
    dict records (replay, demo) and the byte records (Kafka) alike, and both validate against the schema."""
    op = LiquidOperator(Forecaster(n_channels=2, hidden_size=4), OperatorSettings())
    rng = np.random.default_rng(0)
    n = 60
    values = rng.standard_normal((n, 2)).astype(np.float32)
    values[50] += 40.0  # one reading far from anything seen
    result = op.process(["d"] * n, np.arange(n, dtype=np.int64) * 1000 + TS, values)
    sources = [("in", 0, i) for i in range(n)]
    dicts = [rec for _, rec in prediction_records(["d"] * n, result, op.model_version, sources)]
    encoded = [json.loads(v) for _, v in encode_predictions(["d"] * n, result, op.model_version, sources) if v]
    assert [r["anomaly_score"] for r in dicts] == pytest.approx([r["anomaly_score"] for r in encoded], nan_ok=True)
    scores = [PredictionRecord.model_validate(r).anomaly_score for r in encoded]
    assert scores[0] is None and all(s is not None and 0.0 <= s <= 1.0 for s in scores[1:])
    calm = [s for s in scores[21:50] if s is not None]
    assert min(scores[50:52]) > max(calm)  # type: ignore[type-var]  # the spike and the return from it stand out
    assert "anomaly_score" in json_schema("prediction")["required"]


def test_alert_records_the_worker_publishes_follow_the_schema() -> None:
    """What :func:`alert_records` builds from a real operator result validates, ``reason`` included."""
    op = LiquidOperator(Forecaster(n_channels=2, hidden_size=4),
                        OperatorSettings(warmup_events=2, stuck_after=3, max_alert_events=4, cooldown_events=2))
    n = 12
    result = op.process(["d"] * n, np.arange(n, dtype=np.int64) * 1000 + TS, np.ones((n, 2), np.float32))
    records = alert_records(result, op.model_version, [("in", 0, i) for i in range(n)])
    assert records, "a channel repeating one value opens a stuck_sensor alert"
    assert [i for i, _ in records] == sorted(i for i, _ in records), "in input order"
    events = [(rec["event"], rec["alert_id"]) for _, rec in records]
    assert events[:2] == [("opened", events[0][1]), ("closed", events[0][1])], events  # closed at max length
    for index, value in records:
        rec = AlertRecord.model_validate(value)
        assert rec.reason in set(AlertReason) and rec.source.offset == index  # type: ignore[union-attr]
    assert "reason" in json_schema("alert")["required"]


@pytest.mark.parametrize("bad", [{"partition": -1}, {"offset": -1}])
def test_source_coordinates_are_non_negative(bad: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        Source.model_validate({"topic": "t", "partition": 0, "offset": 0, **bad})


def test_json_schemas_document_the_contract() -> None:
    schemas = {name: json_schema(name) for name in ("reading", "prediction")}
    reading = schemas["reading"]
    assert reading["properties"]["ts"]["type"] == "integer"
    assert reading["properties"]["values"]["items"]["type"] == "number"
    assert reading["properties"]["device_id"]["maxLength"] == 256
    assert set(schemas["prediction"]["required"]) >= {"forecast_ts", "score", "source", "status"}
    assert json.dumps(schemas)  # serialisable as-is for the docs
