"""The published output contract (liquidstream.pipeline.wire.contract): the files in docs/schemas/ are the models'
schemas, every field is described, every produced status and reason is declared, and what the Kafka batch step,
file replay and the demo really write validates against the same models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message

from liquidstream.operators import AlertReason, Forecaster, LiquidOperator, OperatorSettings
from liquidstream.pipeline.cli.entry import main
from liquidstream.pipeline.cli.reference import KINDS, schema_text
from liquidstream.pipeline.kafka.batch_step import handle_batch
from liquidstream.pipeline.kafka.output import OutputTopics
from liquidstream.pipeline.offline.replay import ReplayConfig, run_replay
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.codec import DecodeLimits
from liquidstream.pipeline.wire.contract import (
    SCHEMA_VERSION,
    SCHEMAS,
    STATUS_VALUES,
    AlertRecord,
    DeadLetterRecord,
    PredictionRecord,
    json_schema,
)
from liquidstream.pipeline.wire.dead_letters import dead_letter_record

DOCS = Path(__file__).resolve().parents[3] / "docs" / "schemas"
T0 = 1_767_225_600_000
NOW_MS = T0 + 10_000_000


@pytest.mark.parametrize("name", KINDS)
def test_published_schema_files_equal_the_models(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/schemas/<name>.json is what `liquidstream schema <name>` prints (regenerate it with that command)."""
    assert (DOCS / f"{name}.json").read_text() == schema_text(name), \
        f"docs/schemas/{name}.json is stale: run `liquidstream schema {name} > docs/schemas/{name}.json`"
    assert main(["schema", name]) == 0
    assert capsys.readouterr().out == schema_text(name)
    assert json_schema(name)["$id"].endswith(f":{name}:{SCHEMA_VERSION}")


def _properties(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = dict(schema["properties"])
    for name, sub in schema.get("$defs", {}).items():
        if sub.get("type") == "object":
            out.update({f"{name}.{k}": v for k, v in sub["properties"].items()})
    return out


@pytest.mark.parametrize("name", KINDS)
def test_every_field_is_described(name: str) -> None:
    undescribed = [k for k, v in _properties(json_schema(name)).items() if not v.get("description")]
    assert undescribed == []


def test_every_status_and_reason_is_declared() -> None:
    status = json_schema("prediction")["properties"]["status"]
    assert status["enum"] == list(STATUS_VALUES)
    assert "ok+long_gap" in status["enum"] and "gap_reset" not in json.dumps(json_schema("prediction"))
    reasons = json_schema("alert")["$defs"]["AlertReason"]["enum"]
    assert reasons == [r.value for r in AlertReason]  # generated from the enum: a new reason is declared at once
    for reason in AlertReason:
        assert f'"{reason.value}"' in json_schema("alert")["properties"]["reason"]["description"]
    with pytest.raises(ValueError, match="status"):
        PredictionRecord.model_validate({**_prediction(), "status": "gap_reset"})


def _prediction() -> dict[str, Any]:
    return {"device_id": "d", "ts": T0, "forecast": [1.0], "forecast_std": [0.1], "forecast_ts": T0 + 1000,
            "horizon_s": 1.0, "score": None, "anomaly_score": None, "threshold": 4.0, "is_alert": False,
            "status": "first", "model_version": "v", "source": {"file": "f.jsonl", "line": 1}}


def _message(offset: int, value: bytes, key: bytes | None = b"d") -> Message:
    return Message(topic="readings", partition=0, offset=offset, key=key, value=value)


def test_kafka_records_validate_and_carry_schema_headers_and_event_time() -> None:
    """A real batch: first, ok, a long gap, a stuck channel's alert, a late reading and a malformed message."""
    op = LiquidOperator(Forecaster(n_channels=2, hidden_size=4), OperatorSettings(warmup_events=2, stuck_after=3,
                                                                                  max_gap_s=60.0))
    times = [T0 + 1000 * k for k in range(8)] + [T0 + 500_000, T0 + 1500]  # a long gap, then a late reading
    msgs = [_message(k, json.dumps({"device_id": "d", "ts": t, "values": [1.0, 2.0]}).encode())
            for k, t in enumerate(times)]
    msgs.append(_message(len(msgs), b"{not json"))
    limits = DecodeLimits(n_channels=2, max_payload_bytes=4096, ts_min_ms=0, max_future_ms=60_000)
    by_topic: dict[str, list[Any]] = {}
    for batch in (msgs[:9], msgs[9:]):  # the late reading in the next batch (within one, readings are sorted)
        out = handle_batch(batch, op, OutputTopics("preds", "alerts", "dlq"), limits, NOW_MS, worker_id="w")
        for rec in out.records:
            by_topic.setdefault(rec.topic, []).append(rec)
    preds = [PredictionRecord.model_validate_json(r.value) for r in by_topic["preds"]]
    assert {p.status for p in preds} >= {"first", "ok", "ok+long_gap"}
    assert [r.timestamp for r in by_topic["preds"]] == [p.ts for p in preds]  # the reading's event time
    alerts = [AlertRecord.model_validate_json(r.value) for r in by_topic["alerts"]]
    assert alerts and alerts[0].reason is AlertReason.STUCK_SENSOR
    assert [r.timestamp for r in by_topic["alerts"]] == [a.ts for a in alerts]
    letters = [DeadLetterRecord.model_validate(dead_letter_record(r.headers)) for r in by_topic["dlq"]]
    assert sorted(d.reason.value for d in letters) == ["late", "malformed_json"]
    assert {d.source.model_dump()["topic"] for d in letters} == {"readings"}
    for topic, name in (("preds", "prediction"), ("alerts", "alert"), ("dlq", "dead-letter")):
        for rec in by_topic[topic]:
            headers = dict(rec.headers)
            assert headers["ls.schema"] == name.encode()
            assert headers["ls.schema.version"] == str(SCHEMA_VERSION).encode()


def test_producer_clock_when_event_time_timestamps_are_off() -> None:
    op = LiquidOperator(Forecaster(n_channels=2, hidden_size=4), OperatorSettings())
    topics = OutputTopics.from_settings(Settings(event_time_timestamps=False))
    limits = DecodeLimits(n_channels=2, max_payload_bytes=4096, ts_min_ms=0, max_future_ms=60_000)
    out = handle_batch([_message(0, json.dumps({"device_id": "d", "ts": T0, "values": [1, 2]}).encode())], op,
                       topics, limits, NOW_MS)
    assert [r.timestamp for r in out.records] == [0]


def test_replay_records_validate_with_their_file_source(tmp_path: Path) -> None:
    lines = [json.dumps({"device_id": "d", "ts": T0 + 1000 * k, "values": [1.0, 2.0]}) for k in range(30)]
    lines.insert(5, "garbage")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    settings = Settings(operator=OperatorSettings(warmup_events=2, stuck_after=3))
    run_replay(settings, src, tmp_path / "out", ReplayConfig(hidden_size=4), show=False)
    out = tmp_path / "out"
    preds = [PredictionRecord.model_validate_json(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p.source.model_dump() for p in preds[:6]] == [{"file": str(src), "line": n} for n in (1, 2, 3, 4, 5, 7)]
    alerts = [AlertRecord.model_validate_json(x) for x in (out / "alerts.jsonl").read_text().splitlines()]
    assert alerts and all(a.source.model_dump()["file"] == str(src) for a in alerts)
    invalid = [DeadLetterRecord.model_validate_json(x) for x in (out / "invalid.jsonl").read_text().splitlines()]
    assert [(d.reason.value, d.line, d.source.model_dump()) for d in invalid] == \
        [("malformed_json", 6, {"file": str(src), "line": 6})]


def test_every_schema_rejects_undeclared_fields() -> None:
    """A produced field the contract does not declare fails the tests above instead of slipping out."""
    for model in SCHEMAS.values():
        if model.model_config.get("extra") == "forbid":
            with pytest.raises(ValueError, match="Extra inputs"):
                model.model_validate({"undeclared": 1})
    assert {m.model_config.get("extra") for n, m in SCHEMAS.items() if n != "reading"} == {"forbid"}
