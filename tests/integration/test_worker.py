"""``liquidstream simulate`` and ``liquidstream run`` as subprocesses against a real Apache Kafka broker.

(a) a full run: every input message gets exactly one output (a prediction for each valid reading, a dead
letter with the right class for each injected fault), alerts find the injected incidents, the worker exits 0
once idle with balanced stats.  (b) SIGTERM mid-stream, then a restart in the same group (exactly-once, the
default): every valid reading has exactly one prediction, every fault one dead letter, and the restarted
worker continues from the state the first one left in the changelog.  (c) the same with
``--guarantee at_least_once``: a clean stop commits everything, so nothing is duplicated there either.
Crashes (SIGKILL) and rebalances are in ``test_exactly_once.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, Consumer

from liquidstream.pipeline.eval.incidents import score_incidents
from liquidstream.pipeline.offline.fleet_messages import FAULT_REASONS, MALFORMED_KINDS
from liquidstream.pipeline.wire.contract import SCHEMA_VERSION, SCHEMAS, AlertRecord, DeadLetterRecord, PredictionRecord
from liquidstream.pipeline.wire.dead_letters import dead_letter_record
from tests.integration.conftest import (
    Topics,
    check_dead_letters,
    committed_total,
    dlq_sources,
    drain,
    drain_messages,
    finish,
    pred_sources,
    run_cmd,
    simulate_cmd,
    spawn,
)

pytestmark = pytest.mark.integration


def model_name(model: type) -> str:
    """The published schema name of a record model (``prediction``, ``alert``)."""
    return next(name for name, m in SCHEMAS.items() if m is model)


# -------------------------------------------------------------------------------------------- (a)
def test_worker_processes_every_message_exactly_once(kafka_bootstrap: str, topics: Topics, trained_model: Path,
                                                     tmp_path: Path, processes: list[subprocess.Popen[str]],
                                                     group: str) -> None:
    t0 = time.monotonic()
    sim = spawn(simulate_cmd(kafka_bootstrap, topics, tmp_path, "--devices", "100", "--events", "20000",
                             "--malformed", "225", "--duplicates", "20", "--late", "20", "--anomaly-rate", "30",
                             "--seed", "11"), tmp_path / "simulate.log", processes)
    rc, summary = finish(sim, tmp_path / "simulate.log")
    assert rc == 0 and summary["messages"] == 20_265
    inputs = {(r.partition, r.offset): r for r in drain(kafka_bootstrap, topics.input)}
    assert len(inputs) == 20_265
    faults = {c: r.fault for c, r in inputs.items() if r.fault is not None}
    assert set(Counter(faults.values())) == set(FAULT_REASONS)  # every malformed kind, late, duplicate
    valid = set(inputs) - set(faults)

    # Batches of <= 2000 never hold a partition's first and last tenth together, so the injected late
    # readings are always behind their device's clock (late), never merely reordered within a batch.
    log = tmp_path / "worker.log"
    # The simulated fleet's first quarter (about 50 readings a device) is incident-free: its commissioning.
    worker = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--commissioning", "40",
                           "--exit-when-idle", "5", "--batch-max-messages", "2000"), log, processes)
    rc, stats = finish(worker, log)
    print(f"\nworker final stats: {json.dumps(stats)}")
    assert rc == 0, log.read_text()[-4000:]
    assert stats["balanced"] and stats["consumed"] == stats["predictions"] + stats["dead_letters"]
    assert (stats["consumed"], stats["predictions"], stats["dead_letters"]) == (20_265, 20_000, 265)
    assert (stats["late"], stats["duplicates"]) == (20, 20)

    preds = drain(kafka_bootstrap, topics.predictions)
    dlq = drain(kafka_bootstrap, topics.dlq)
    records = [r.json() | {"key": r.key} for r in drain(kafka_bootstrap, topics.alerts)]
    alerts = [a for a in records if a["event"] == "opened"]  # one per incident; its closed record follows it
    closed = Counter(a["alert_id"] for a in records if a["event"] == "closed")
    assert len(preds) == 20_000 and len(dlq) == 265 and len(alerts) == stats["alerts"]
    assert max(closed.values(), default=1) == 1 and set(closed) <= {a["alert_id"] for a in alerts}
    # silences (the simulator's dropouts) start between readings: the checks below are about readings' alerts
    alerts = [a for a in alerts if a["reason"] != "silence"]

    pred_src = pred_sources(preds)
    assert set(pred_src) == valid and max(pred_src.values()) == 1, "a gap or a duplicate among predictions"
    for p in preds:
        rec = p.json()
        src = inputs[(rec["source"]["partition"], rec["source"]["offset"])].json()
        assert (rec["device_id"], rec["ts"], p.key) == (src["device_id"], src["ts"], src["device_id"].encode())
        assert rec["source"]["topic"] == topics.input and len(rec["forecast"]) == 4
    # The published contract: every record validates against its schema, names it in its headers, and carries its
    # reading's event time as Kafka timestamp.
    for topic, model in ((topics.predictions, PredictionRecord), (topics.alerts, AlertRecord)):
        for stamp, value, headers in drain_messages(kafka_bootstrap, topic, lambda m: (m.timestamp(), m.value(),
                                                                                      dict(m.headers() or []))):
            rec = model.model_validate_json(value)
            assert stamp == (TIMESTAMP_CREATE_TIME, rec.ts)
            version = str(SCHEMA_VERSION).encode()
            assert (headers["ls.schema"], headers["ls.schema.version"]) == (model_name(model).encode(), version)
    for raw in drain_messages(kafka_bootstrap, topics.dlq, lambda m: m.headers()):
        assert DeadLetterRecord.model_validate(dead_letter_record(raw)).source.model_dump()["topic"] == topics.input
    assert dlq_sources(dlq, topics.input) == Counter(set(faults)), "a fault missing or doubled on the DLQ"
    check_dead_letters(dlq, inputs, topics.input)
    assert {r.fault for r in dlq} >= set(MALFORMED_KINDS)

    for a in records:  # an alert opens and closes on valid readings of its own device
        if a["reason"] == "silence":  # it starts between readings (the reading that ends it is its source)
            continue
        src = inputs[(a["source"]["partition"], a["source"]["offset"])].json()
        assert (a["device_id"], a["ts"], a["key"]) == (src["device_id"], src["ts"], src["device_id"].encode())
    truth = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    score = score_incidents(((a["device_id"], a["ts"]) for a in alerts),
                            ((i["device_id"], i["kind"], i["start_ms"], i["end_ms"]) for i in truth))
    print(f"alerts vs injected incidents: {json.dumps(score.as_dict())}; "
          f"worker {stats['events_per_s']} events/s; test {time.monotonic() - t0:.1f} s")
    # The alerts that come out are real ones, and a fair share of the incidents is found.  Detection quality is
    # measured by `evaluate` and `make demo`: here devices have about 200 readings, much of which the anomaly
    # likelihood spends learning them (measured: precision 1.0, recall 0.35 with the defaults).
    assert score.incidents >= 20 and score.true_alerts >= 10
    assert score.precision >= 0.9 and score.recall >= 0.25


# -------------------------------------------------------------------------------------------- (b), (c)
@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_sigterm_mid_stream_then_restart_loses_nothing(kafka_bootstrap: str, topics: Topics, trained_model: Path,
                                                       tmp_path: Path, processes: list[subprocess.Popen[str]],
                                                       group: str, guarantee: str) -> None:
    sim = spawn(simulate_cmd(kafka_bootstrap, topics, tmp_path, "--devices", "100", "--events", "12000",
                             "--malformed", "120", "--rate", "2000", "--anomaly-rate", "10", "--seed", "5"),
                tmp_path / "simulate.log", processes)
    log1 = tmp_path / "worker-1.log"
    first = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "60",
                          "--batch-max-messages", "500", "--guarantee", guarantee), log1, processes)
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + 90
        while committed_total(probe, topics.input) < 3000:  # mid-stream: a few batches are committed
            assert first.poll() is None, f"worker exited early:\n{log1.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no progress:\n{log1.read_text()[-4000:]}"
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        rc1, stats1 = finish(first, log1, 60)
        done_by_first = committed_total(probe, topics.input)
        rc, summary = finish(sim, tmp_path / "simulate.log")
        assert rc == 0
        total = summary["messages"]
        print(f"\nfirst run (SIGTERM): {json.dumps(stats1)}; committed {done_by_first}/{total}")
        assert rc1 == 0, log1.read_text()[-4000:]
        assert "signal 15" in log1.read_text() and stats1["balanced"] and stats1["guarantee"] == guarantee
        assert stats1["consumed"] == done_by_first < total  # finished its batch, committed, stopped

        log2 = tmp_path / "worker-2.log"
        second = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "5",
                               "--guarantee", guarantee), log2, processes)
        rc2, stats2 = finish(second, log2)
        print(f"second run: {json.dumps(stats2)}")
        assert rc2 == 0 and stats2["balanced"], log2.read_text()[-4000:]
        assert committed_total(probe, topics.input) == total
        assert stats1["consumed"] + stats2["consumed"] == total  # a clean stop re-delivers nothing
        assert stats2["restored_devices"] == 100  # every device had readings before the stop
    finally:
        probe.close()

    inputs = {(r.partition, r.offset): r for r in drain(kafka_bootstrap, topics.input)}
    assert len(inputs) == total
    faults = {c for c, r in inputs.items() if r.fault is not None}
    assert len(faults) == 120
    pred_src = pred_sources(drain(kafka_bootstrap, topics.predictions))
    assert set(pred_src) == set(inputs) - faults, "a valid reading without prediction (or a fault with one)"
    assert max(pred_src.values()) == 1, "a duplicate prediction"
    dlq = drain(kafka_bootstrap, topics.dlq)
    assert set(dlq_sources(dlq, topics.input)) == faults
    check_dead_letters(dlq, inputs, topics.input)
