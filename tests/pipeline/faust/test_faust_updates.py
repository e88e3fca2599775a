"""The faust app follows signed model updates between batches (liquidstream.pipeline.faust.updates, FaustStep), no
broker:
the worker's fake updates consumer feeds a real ModelFollower, batches are fake faust events."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from liquidstream.operators import LiquidOperator, OperatorSettings
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.follower import ModelFollower
from tests.pipeline.updates.test_model_updates import KEY, OTHER_KEY, UpdatesConsumer, _model, _record

pytest.importorskip("faust")
from liquidstream.pipeline.faust.app import FaustStep  # noqa: E402 (faust is an optional extra)
from liquidstream.pipeline.faust.updates import ModelUpdates  # noqa: E402

SETTINGS = Settings(input_topic="readings", predictions_topic="preds", dlq_topic="dlq", ts_min_ms=0)


class Table(dict[bytes, bytes]):
    """The step's state table: empty; ``on_get`` runs inside a batch (its restore, before ``process``)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_get: list[Any] = []

    def get(self, key: bytes, default: Any = None) -> Any:
        while self.on_get:
            self.on_get.pop()()
        return super().get(key, default)


def _events(start: int, n: int, device: str = "a") -> list[Any]:
    now = time.time_ns() // 1_000_000
    return [SimpleNamespace(message=SimpleNamespace(
        topic="readings", partition=0, offset=start + i, key=device.encode(), headers=None,
        value=json.dumps({"device_id": device, "ts": now - 10_000 + 10 * (start + i), "values": [1.0, 2.0]}).encode()))
        for i in range(n)]


def _step(seed: int = 30) -> tuple[FaustStep, UpdatesConsumer, Metrics, Table]:
    consumer, metrics, table = UpdatesConsumer(), Metrics(), Table()
    operator = LiquidOperator(_model(seed), OperatorSettings(), model_version="v0")
    follower = ModelFollower(Settings(model_signing_key=KEY.decode()), metrics,  # type: ignore[arg-type]
                             consumer=consumer, ensure_topic=lambda: None)  # type: ignore[arg-type]
    updates = ModelUpdates(SETTINGS, operator, follower=follower, metrics=metrics)
    updates.start()
    app = SimpleNamespace(conf=SimpleNamespace(id="g-faust"))
    return FaustStep(app, SETTINGS, operator, table, updates), consumer, metrics, table  # type: ignore[arg-type]


def _versions(step: FaustStep, events: list[Any]) -> list[str]:
    from liquidstream.pipeline.faust.app import EventMessage

    out, _ = step._compute([EventMessage(e) for e in events])
    return [json.loads(r.value or b"")["model_version"] for r in out.records if r.topic == "preds"]


def test_update_arriving_inside_a_batch_is_adopted_before_the_next_one() -> None:
    step, consumer, metrics, table = _step()
    new = _model(31)
    rec = _record(new, seq=1)
    table.on_get.append(lambda: consumer.push(rec))  # lands on the topic mid-batch (after the batch's poll)
    assert _versions(step, _events(0, 3)) == ["v0"] * 3
    assert step.operator.model_version == "v0"
    assert _versions(step, _events(3, 3)) == [rec.version] * 3
    for name, tensor in new.state_dict().items():
        assert torch.equal(step.operator.model.state_dict()[name], tensor)
    assert metrics.value("liquidstream_model_version", version=rec.version) == 1.0
    assert metrics.value("liquidstream_model_version", version="v0") is None
    assert metrics.value("liquidstream_model_updates_total", result="adopted", reason="ok") == 1.0
    summary = step.summary()
    assert summary["model_version"] == rec.version and summary["model_updates"]["adopted"] == 1
    assert summary["model_updates"]["seq"] == 1


def test_forged_unsigned_and_replayed_updates_leave_the_model_alone() -> None:
    step, consumer, metrics, _ = _step()
    before = {k: v.clone() for k, v in step.operator.model.state_dict().items()}
    consumer.push(_record(_model(32), seq=5, key=OTHER_KEY))
    consumer.push(_record(_model(33), seq=6, key=None))
    consumer.push(_record(_model(34, hidden=8), seq=7))  # signed, another architecture
    assert _versions(step, _events(0, 2)) == ["v0"] * 2
    assert all(torch.equal(step.operator.model.state_dict()[k], v) for k, v in before.items())
    first = _record(_model(35), seq=1)
    consumer.push(first)
    assert step.updates is not None and step.updates.adopt() == first.version
    consumer.push(first)  # the adopted record again: stale
    assert step.updates.adopt() is None and step.operator.model_version == first.version
    assert step.updates.stats()["rejected_by_reason"] == {"bad_signature": 1, "incompatible": 1, "stale": 1,
                                                          "unsigned": 1}
    for reason in ("bad_signature", "incompatible", "stale", "unsigned"):
        assert metrics.value("liquidstream_model_updates_total", result="rejected", reason=reason) == 1.0


def test_idle_timer_polls_only_while_no_batch_holds_the_lock() -> None:
    step, consumer, _, _ = _step()
    rec = _record(_model(36), seq=1)
    consumer.push(rec)

    async def scenario() -> list[str]:
        seen = []
        async with step.lock:  # a batch in progress: the timer neither polls nor waits for it
            await asyncio.wait_for(step.follow(), timeout=5.0)
            seen.append(step.operator.model_version)
        await step.follow()
        seen.append(step.operator.model_version)
        return seen

    assert asyncio.run(scenario()) == ["v0", rec.version]
    assert not step.lock.locked()


def test_closed_follower_adopts_nothing_and_settings_switch_it() -> None:
    step, consumer, _, _ = _step()
    asyncio.run(step.on_shutdown(None, signal=None))
    assert consumer.closed
    consumer.push(_record(_model(37), seq=1))
    assert step.updates is not None and step.updates.adopt() is None and step.operator.model_version == "v0"
    assert step.updates.stats()["adopted"] == 0
    operator = LiquidOperator(_model(38), OperatorSettings())
    assert ModelUpdates.from_settings(Settings(), operator) is None  # no key: the worker does not follow either
    off = Settings(model_signing_key=KEY.decode(), follow_model_updates=False)  # type: ignore[arg-type]
    assert ModelUpdates.from_settings(off, operator) is None
