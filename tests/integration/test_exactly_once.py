"""Exactly-once processing and per-device state recovery, against a real Apache Kafka broker.

(a) Chaos: the worker is SIGKILLed at seeded random moments (some of them while one of its transactions is
seen open) and restarted in the same group each time.
(b) Scale-out and back: a second worker joins the group mid-stream (partitions move to it with their
state) and later leaves on SIGTERM (they move back).

Afterwards a ``read_committed`` reader must find exactly one prediction per valid reading (by source
partition and offset: no gap, no duplicate) and one dead letter per malformed message, and every prediction
must equal (forecast, forecast_std, score within 1e-4) the one of an uninterrupted reference: the operator
run in this process over each partition's messages in offset order, with the same model.  That equality
holds only if the state each restart or new owner restored is exactly the state the previous owner had
committed with the offsets.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from tests.integration.conftest import (
    FAST_GROUP_CONFIG,
    PARTITIONS,
    Coord,
    Rec,
    Topics,
    check_dead_letters,
    committed_total,
    dlq_sources,
    drain,
    finish,
    pred_sources,
    run_cmd,
    simulate_cmd,
    spawn,
)

pytestmark = pytest.mark.integration

SEED = 20_240_611  # kill moments
KILLS = 3
TOLERANCE = 1e-4
SCALE_EVENTS = 16_000  # readings of the scale-out test (paced at 700/s)
PROGRESS_DEADLINE_S = 90.0  # seconds a worker may take to commit the next stretch of input
Prediction = tuple[list[float], list[float], float | None]  # forecast, forecast_std, score
ENV = {"LIQUIDSTREAM_KAFKA_CONFIG": FAST_GROUP_CONFIG}


class Reference(dict[Coord, Prediction]):
    """Predictions of an uninterrupted run by input coordinates, and its alert lifecycle records
    (``(event, alert_id, readings)`` counted)."""

    alerts: Counter[tuple[str, str, int | None]]


def alert_lifecycle(docs: Iterable[dict[str, Any]]) -> Counter[tuple[str, str, int | None]]:
    return Counter((d["event"], d["alert_id"], d.get("readings")) for d in docs)


def reference(inputs: dict[Coord, Rec], topic: str, model: Path) -> Reference:
    """Predictions of an uninterrupted run: one operator, each partition's messages in offset order."""
    import torch

    from liquidstream.operators import LiquidOperator
    from liquidstream.operators.model_io import load_model
    from liquidstream.pipeline.kafka.batch_step import handle_batch
    from liquidstream.pipeline.kafka.output import OutputTopics
    from liquidstream.pipeline.settings import Settings
    from liquidstream.pipeline.wire.codec import DecodeLimits

    settings = Settings(device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, doc = load_model(model, "cpu")
        op = LiquidOperator(net, settings.operator, device="cpu", model_version=str(doc["version"]))
        limits = DecodeLimits.from_settings(settings, op.n_channels)
        out = Reference()
        alert_docs: list[dict[str, Any]] = []
        for p in range(PARTITIONS):
            msgs = [Message(topic=topic, partition=p, offset=o, key=r.key, value=r.value)
                    for (q, o), r in sorted(inputs.items()) if q == p]
            result = handle_batch(msgs, op, OutputTopics("p", "a", "d"), limits, time.time_ns() // 1_000_000)
            for rec in result.records:
                if rec.topic == "p":
                    doc = json.loads(rec.value or b"")
                    out[(p, doc["source"]["offset"])] = (doc["forecast"], doc["forecast_std"], doc["score"])
                elif rec.topic == "a":
                    alert_docs.append(json.loads(rec.value or b""))
        out.alerts = alert_lifecycle(alert_docs)
        return out
    finally:
        torch.set_num_threads(threads)


def check_exactly_once(bootstrap: str, topics: Topics, inputs: dict[Coord, Rec], ref: dict[Coord, Prediction]) -> float:
    """Exactly one prediction per valid reading, equal to the reference; one dead letter per fault.  Returns
    the largest difference seen."""
    faults = {c for c, r in inputs.items() if r.fault is not None}
    preds = drain(bootstrap, topics.predictions)
    counts = pred_sources(preds)
    missing, extra = set(inputs) - faults - set(counts), set(counts) - (set(inputs) - faults)
    dup = {c: n for c, n in counts.items() if n > 1}
    assert not missing and not extra and not dup, f"gaps {sorted(missing)[:5]} ({len(missing)}), " \
        f"foreign {sorted(extra)[:5]}, duplicates {sorted(dup.items())[:5]} ({len(dup)})"
    assert set(ref) == set(counts)
    worst = 0.0
    for p in preds:
        doc: dict[str, Any] = p.json()
        forecast, std, score = ref[(doc["source"]["partition"], doc["source"]["offset"])]
        assert (doc["score"] is None) == (score is None), (doc, score)
        diffs = [np.abs(np.subtract(doc["forecast"], forecast)).max(),
                 np.abs(np.subtract(doc["forecast_std"], std)).max(),
                 abs(doc["score"] - score) if score is not None else 0.0]
        worst = max(worst, *map(float, diffs))
        assert max(diffs) <= TOLERANCE, f"prediction for {doc['source']} differs by {max(diffs)} from the reference"
    dlq = drain(bootstrap, topics.dlq)
    assert dlq_sources(dlq, topics.input) == {c: 1 for c in faults}, "a fault missing or doubled on the DLQ"
    check_dead_letters(dlq, inputs, topics.input)
    return worst


def check_alerts(bootstrap: str, topics: Topics, ref: Reference) -> int:
    """The committed alerts topic holds the uninterrupted run's lifecycle exactly: every alert opened once and
    closed at most once (with the same length), none doubled by a restart, none lost.  Returns the count.

    Silences still open at the end are left out of the comparison (each must still appear once): the worker's timer
    notices those by wall time, which the reference does not have.  A silence that ended is in both, with one id,
    whoever noticed it."""
    docs = [r.json() for r in drain(bootstrap, topics.alerts)]
    ended = {d["alert_id"] for d in docs if d["event"] == "closed"}
    still_open = [d["alert_id"] for d in docs if d["reason"] == "silence" and d["alert_id"] not in ended]
    assert len(still_open) == len(set(still_open)), "a silence opened twice"
    got = alert_lifecycle(d for d in docs if d["alert_id"] not in set(still_open))
    want = Counter({k: n for k, n in ref.alerts.items() if k[1] not in set(still_open)})
    assert got == want, f"alert lifecycle differs: extra {got - want}, missing {want - got}"
    closed = {aid for event, aid, _ in got if event == "closed"}
    assert closed <= {aid for event, aid, _ in got if event == "opened"}
    return sum(got.values())


def restored_counts(log: Path) -> list[int]:
    """Devices restored per assignment, from a worker's log."""
    return [int(n) for n in re.findall(r"restored (\d+) device\(s\)", log.read_text())]


def wait_for(probe: Consumer, topic: str, target: int, proc: subprocess.Popen[str], log: Path) -> int:
    """Wait until the group committed ``target`` input messages (sum over partitions); return the count."""
    deadline = time.monotonic() + PROGRESS_DEADLINE_S
    while (done := committed_total(probe, topic)) < target:
        assert proc.poll() is None, f"worker exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"stuck at {done}/{target}:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)
    while not restored_counts(log):  # a worker killed before it restored proves nothing about restores
        assert proc.poll() is None, f"worker exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no restore:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)
    return done


def transaction_open(committed: Consumer, uncommitted: Consumer, topic: str) -> bool:
    """True while records of an unfinished transaction sit in ``topic``: the high watermark is ahead of the
    last stable offset (which is what a ``read_committed`` client's watermark query returns)."""
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    return any(uncommitted.get_watermark_offsets(tp, timeout=5)[1] > committed.get_watermark_offsets(tp, timeout=5)[1]
               for tp in tps)


def produced(bootstrap: str, topics: Topics, sim: subprocess.Popen[str], log: Path) -> dict[Coord, Rec]:
    rc, summary = finish(sim, log)
    assert rc == 0, log.read_text()[-4000:]
    inputs = {(r.partition, r.offset): r for r in drain(bootstrap, topics.input)}
    assert len(inputs) == summary["messages"]
    return inputs


# -------------------------------------------------------------------------------------------- (a)
def test_sigkill_at_random_moments_gives_exactly_one_equal_prediction(
        kafka_bootstrap: str, topics: Topics, trained_model: Path, tmp_path: Path,
        processes: list[subprocess.Popen[str]], group: str) -> None:
    t0, rng = time.monotonic(), random.Random(SEED)
    sim = spawn(simulate_cmd(kafka_bootstrap, topics, tmp_path, "--devices", "100", "--events", "20000",
                             "--malformed", "15", "--anomaly-rate", "10", "--seed", "23"), tmp_path / "sim.log",
                processes)
    inputs = produced(kafka_bootstrap, topics, sim, tmp_path / "sim.log")
    total = len(inputs)
    ref = reference(inputs, topics.input, trained_model)
    assert len(ref) == 20_000
    worker_args = ("--batch-max-messages", "500", "--worker-id", "chaos")  # same transactional id each life
    # read_uncommitted: its committed-offset queries do not wait for a killed worker's open transaction
    # (read_committed ones would, until the next life aborts it); its watermarks are high watermarks.
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                      "isolation.level": "read_uncommitted"})
    stable = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    at_kill: list[tuple[int, bool]] = []  # (input committed, transaction seen open) at each kill
    try:
        for life, fraction in enumerate(sorted(rng.uniform(0.1, 0.8) for _ in range(KILLS))):
            log = tmp_path / f"worker-{life}.log"
            proc = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "300",
                                 *worker_args), log, processes, ENV)
            # capped at the input's end: a fast worker may have committed it all before its predecessor's kill
            target = min(total, max(int(fraction * total), (at_kill[-1][0] if at_kill else 0) + 1000))
            wait_for(probe, topics.input, target, proc, log)
            # Half the kills at a random moment, half as soon as a transaction is seen open (records written,
            # not committed: the next life's init_transactions must abort them).
            deadline = time.monotonic() + (rng.uniform(0.0, 0.4) if rng.random() < 0.5 else 5.0)
            while not (in_txn := transaction_open(stable, probe, topics.predictions)) and time.monotonic() < deadline:
                pass
            proc.kill()
            proc.wait(timeout=30)
            at_kill.append((committed_total(probe, topics.input), in_txn))
        log = tmp_path / "worker-final.log"
        final = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "5",
                              *worker_args), log, processes, ENV)
        rc, stats = finish(final, log)
        assert rc == 0 and stats["balanced"], log.read_text()[-4000:]
        assert committed_total(probe, topics.input) == total
    finally:
        probe.close()
        stable.close()
    for life in range(1, KILLS):  # every restart found the state its predecessor committed
        assert restored_counts(tmp_path / f"worker-{life}.log")[0] > 0
    assert stats["restored_devices"] > 0
    worst = check_exactly_once(kafka_bootstrap, topics, inputs, ref)
    n_alerts = check_alerts(kafka_bootstrap, topics, ref)
    aborted = len(drain(kafka_bootstrap, topics.predictions, committed_only=False)) - len(ref)
    print(f"\n{n_alerts} alert records (opened and closed) equal to the reference's; "
          f"killed at committed {at_kill}/{total}; final run {json.dumps(stats)}; {aborted} prediction(s) of "
          f"killed transactions invisible to read_committed; max |diff| vs reference {worst:.2e}; "
          f"test {time.monotonic() - t0:.1f} s")


# -------------------------------------------------------------------------------------------- (b)
@dataclass(frozen=True)
class Handover:
    """What :func:`join_and_leave` saw: the inputs, each worker's final stats, the committed totals."""

    inputs: dict[Coord, Rec]
    stats_a: dict[str, Any]
    stats_b: dict[str, Any]
    joined_at: int
    left_at: int


def join_and_leave(bootstrap: str, topics: Topics, model: Path, tmp: Path, processes: list[subprocess.Popen[str]],
                   group: str, *, events: int, seed: int, overlap: int, worker_args: tuple[str, ...]) -> Handover:
    """Worker a runs; b joins once a has committed 1,000 readings, works ``overlap`` more, leaves on SIGTERM;
    a finishes.  Both must exit cleanly, hand partitions over with their devices' state and re-process
    nothing."""
    # Paced input, so that the stream is still flowing while the second worker joins and leaves.
    sim = spawn(simulate_cmd(bootstrap, topics, tmp, "--devices", "100", "--events", str(events),
                             "--malformed", "10", "--rate", "700", "--anomaly-rate", "10", "--seed", str(seed)),
                tmp / "sim.log", processes)
    log_a, log_b = tmp / "worker-a.log", tmp / "worker-b.log"
    a = spawn(run_cmd(bootstrap, topics, group, model, "--exit-when-idle", "8", "--worker-id", "a",
                      *worker_args), log_a, processes, ENV)
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        wait_for(probe, topics.input, 1000, a, log_a)
        b = spawn(run_cmd(bootstrap, topics, group, model, "--exit-when-idle", "300",
                          "--worker-id", "b", *worker_args), log_b, processes, ENV)
        deadline = time.monotonic() + PROGRESS_DEADLINE_S
        while not re.search(r"assigned \['", log_b.read_text()):  # a non-empty assignment: it took over
            assert b.poll() is None and time.monotonic() < deadline, log_b.read_text()[-4000:]
            time.sleep(0.1)
        joined_at = committed_total(probe, topics.input)
        # Both work for a while (bounded, so that b leaves before the paced input ends on a slow machine).
        wait_for(probe, topics.input, min(joined_at + overlap, events - 1500), b, log_b)
        b.send_signal(signal.SIGTERM)
        rc_b, stats_b = finish(b, log_b, 60)
        left_at = committed_total(probe, topics.input)
        inputs = produced(bootstrap, topics, sim, tmp / "sim.log")
        rc_a, stats_a = finish(a, log_a)
    finally:
        probe.close()
    assert rc_b == 0 and stats_b["balanced"] and stats_b["consumed"] > 0, log_b.read_text()[-4000:]
    assert rc_a == 0 and stats_a["balanced"], log_a.read_text()[-4000:]
    assert stats_b["restored_devices"] > 0  # took the partitions over with their devices' state
    assert max(restored_counts(log_a)[1:], default=0) > 0, "the leaver's partitions came back without state"
    assert stats_a["consumed"] + stats_b["consumed"] == len(inputs)  # clean hand-overs re-process nothing
    return Handover(inputs, stats_a, stats_b, joined_at, left_at)


def test_worker_joining_and_leaving_keeps_exactly_once(
        kafka_bootstrap: str, topics: Topics, trained_model: Path, tmp_path: Path,
        processes: list[subprocess.Popen[str]], group: str) -> None:
    t0 = time.monotonic()
    run = join_and_leave(kafka_bootstrap, topics, trained_model, tmp_path, processes, group, events=SCALE_EVENTS,
                         seed=31, overlap=2500, worker_args=("--batch-max-messages", "500"))
    ref = reference(run.inputs, topics.input, trained_model)
    worst = check_exactly_once(kafka_bootstrap, topics, run.inputs, ref)
    check_alerts(kafka_bootstrap, topics, ref)
    print(f"\nb joined at {run.joined_at}, left at {run.left_at} of {len(run.inputs)}; a {json.dumps(run.stats_a)}; "
          f"b {json.dumps(run.stats_b)}; max |diff| vs reference {worst:.2e}; test {time.monotonic() - t0:.1f} s")
