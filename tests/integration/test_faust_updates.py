"""The faust app follows signed model updates on a real broker, as ``liquidstream run`` does.

One app process serves a stream produced in three parts, each only after the app predicted the previous one, so
every part is served by a known model: part 1 by the starting model A; then a forged (wrong key) and an unsigned
update of other weights are published and must be rejected, so part 2 is still A's; then a signed update with
weights B is published, the idle app adopts it (its timer), and part 3 must be B's: labelled with B's version and
equal to a direct ``LiquidOperator`` run that swaps A for B at the same point (device state kept).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster, LiquidOperator
from liquidstream.operators.model_io import load_model
from liquidstream.pipeline.offline.simulator import SimulatedStream, simulate
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.publisher import UpdatePublisher
from liquidstream.pipeline.updates.record import UpdateRecord, build_record
from liquidstream.pipeline.wire.records import prediction_records
from tests.integration.test_faust_app import (
    PARTITIONS,
    Collector,
    _close,
    _committed,
    _produce,
    _reading_messages,
    _save_model,
    _stop,
    _wait_for,
    _where,
)
from tests.integration.test_faust_app import run_app as run_app  # noqa: F401 (the fixture, shared)

if TYPE_CHECKING:
    from tests.conftest import MakeTopic

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "faust-integration-signing-key-0123"
WRONG_KEY = b"attacker-key-0123456789abcdef"
WAIT_S = 60.0  # seconds to wait for one log line


def _weights(seed: int) -> Forecaster:
    """Model A's architecture with other weights everywhere (A's head starts at zero: so must not B's)."""
    torch.manual_seed(seed)
    model = Forecaster(n_channels=4, hidden_size=16, cell="cfc")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _record(model: Forecaster, seq: int, key: bytes | None) -> UpdateRecord:
    return build_record(model.state_dict(), model.config(), seq=seq, lineage="forecaster", signing_key=key)


def _wait_log(log: Path, line: str, count: int = 1) -> None:
    deadline = time.monotonic() + WAIT_S
    while log.read_text().count(line) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{count} x {line!r} not logged after {WAIT_S} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)


def _run(operator: LiquidOperator, part: SimulatedStream, coords: list[tuple[int, int]], topic: str) -> dict[Any, Any]:
    recs = list(part.records())
    result = operator.process([r["device_id"] for r in recs], np.array([r["ts"] for r in recs]),
                              np.array([r["values"] for r in recs], dtype=np.float32))
    sources = [(topic, p, o) for p, o in coords]
    return {_where(rec): rec for _, rec in prediction_records([r["device_id"] for r in recs], result,
                                                              operator.model_version, sources)}


def test_faust_app_adopts_signed_updates_and_rejects_forged_ones(kafka_bootstrap: str, make_topic: MakeTopic,
                                                                 tmp_path: Path, run_app: Any) -> None:
    source, predictions, alerts, dlq = (make_topic(PARTITIONS, prefix=p) for p in ("in", "pred", "alert", "dlq"))
    updates = make_topic(1, prefix="model-updates", config={"cleanup.policy": "compact"})
    model_path = _save_model(tmp_path / "model.pt")
    group = f"it-{uuid.uuid4().hex[:8]}"
    env = {"LIQUIDSTREAM_BOOTSTRAP": kafka_bootstrap, "LIQUIDSTREAM_INPUT_TOPIC": source,
           "LIQUIDSTREAM_PREDICTIONS_TOPIC": predictions, "LIQUIDSTREAM_ALERTS_TOPIC": alerts,
           "LIQUIDSTREAM_DLQ_TOPIC": dlq, "LIQUIDSTREAM_GROUP_ID": group, "LIQUIDSTREAM_MODEL": str(model_path),
           "LIQUIDSTREAM_DEVICE": "cpu", "LIQUIDSTREAM_BATCH_MAX_MESSAGES": "64", "LIQUIDSTREAM_BATCH_MAX_MS": "50",
           "LIQUIDSTREAM_GUARANTEE": "at_least_once", "LIQUIDSTREAM_MODEL_SIGNING_KEY": KEY,
           "LIQUIDSTREAM_MODEL_UPDATES_TOPIC": updates}
    publisher = UpdatePublisher(Settings(bootstrap=kafka_bootstrap, model_updates_topic=updates))
    publisher.start()  # transactional (trainer fencing); its id is per updates topic, and this topic is new
    stream = simulate(n_devices=8, duration_s=45.0, seed=6, anomaly_rate=0.0)
    first, rest = stream.split_by_time(1 / 3)
    parts = (first, *rest.split_by_time(0.5))
    new = _weights(8)
    signed = _record(new, seq=1, key=KEY.encode())
    collector = Collector(kafka_bootstrap, predictions, alerts, dlq)
    proc, log = run_app(env, "app")
    coords: list[list[tuple[int, int]]] = []
    try:
        for k, part in enumerate(parts):
            if k == 1:  # forged and unsigned, a higher seq each, other weights: both rejected, A stays
                for rec in (_record(_weights(9), seq=5, key=WRONG_KEY), _record(_weights(9), seq=6, key=None)):
                    publisher.publish(rec)
                _wait_log(log, "rejected model update", 2)
            if k == 2:  # signed: adopted while the app is idle (its timer), before part 3 arrives
                publisher.publish(signed)
                _wait_log(log, f"adopting model update seq 1 version {signed.version}")
            coords.append(_produce(kafka_bootstrap, source, _reading_messages(part)))
            _wait_for(collector, proc, log, {c for cs in coords for c in cs}, set(),
                      lambda: _committed(kafka_bootstrap, group + "-faust", source))
        code = _stop(proc)
        collector.poll(1.0)
    finally:
        collector.close()
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert KEY not in text, "the signing key is a secret"
    # start-up lines, written before faust sets up its logging, are not lost
    assert "following model updates of lineage 'forecaster'" in text and "faust app " in text
    final = json.loads(text.split("final stats ", 1)[1].splitlines()[0])
    assert final["model_version"] == signed.version
    assert final["model_updates"] == {"adopted": 1, "rejected": 2, "superseded": 0, "seq": 1,
                                      "rejected_by_reason": {"bad_signature": 1, "unsigned": 1}}

    # Reference: A over parts 1 and 2, then B (state kept) over part 3, each part in stream order.
    model, doc = load_model(model_path)
    operator = LiquidOperator(model, Settings().operator, model_version=str(doc["version"]))
    expected = _run(operator, parts[0], coords[0], source) | _run(operator, parts[1], coords[1], source)
    only_a = LiquidOperator(model, Settings().operator, model_version="A")  # what A would have said on part 3
    for k in (0, 1):
        _run(only_a, parts[k], coords[k], source)
    stale = _run(only_a, parts[2], coords[2], source)
    operator.swap_model(new, signed.version)
    expected |= _run(operator, parts[2], coords[2], source)

    got = {_where(rec): rec for rec in (json.loads(m.value() or b"") for m in collector.records[predictions])}
    assert got.keys() == expected.keys()
    part_of = {c: k for k, cs in enumerate(coords) for c in cs}
    served: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    for where, rec in got.items():
        served[part_of[where]].add(rec["model_version"])
        want = expected[where]
        assert all(_close(a, b) for a, b in zip(rec["forecast"], want["forecast"], strict=True)), (where, rec, want)
        assert _close(rec["score"], want["score"]), where
    assert served == {0: {str(doc["version"])}, 1: {str(doc["version"])}, 2: {signed.version}}
    changed = sum(not all(_close(a, b) for a, b in zip(got[w]["forecast"], stale[w]["forecast"], strict=True))
                  for w in coords[2])
    assert changed == len(coords[2]), "part 3's forecasts are B's, not A's"
