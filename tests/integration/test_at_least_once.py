"""At-least-once with pipelined commits (``liquidstream.pipeline.kafka.at_least_once``), against a real Apache Kafka
broker.

The worker overlaps a batch's delivery wait, changelog and offset commit with the next batches.  (a) SIGKILLed
at seeded random moments and restarted in the same group: every valid reading still has a prediction (no
gap: nothing committed, and no progress record written, before the outputs below it were delivered), every
prediction -- duplicates included -- equals the uninterrupted reference (the state each restart restored is
the state its predecessor had when it wrote those outputs), every fault has a dead letter.  (b) A second
worker joins mid-stream and leaves on SIGTERM: the revocations settle what is in flight, so the hand-overs
re-process nothing and every valid reading has exactly one prediction, equal to the reference.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer

from tests.integration.conftest import (
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
from tests.integration.test_exactly_once import (
    ENV,
    TOLERANCE,
    Prediction,
    check_exactly_once,
    join_and_leave,
    produced,
    reference,
    restored_counts,
    wait_for,
)

pytestmark = pytest.mark.integration

SEED = 20_261_205  # kill moments
KILLS = 3
ALO = ("--guarantee", "at_least_once", "--batch-max-messages", "500")


def check_at_least_once(bootstrap: str, topics: Topics, inputs: dict[Coord, Rec],
                        ref: dict[Coord, Prediction]) -> tuple[int, float]:
    """At least one prediction per valid reading, each equal to the reference; at least one dead letter per
    fault.  Returns (duplicate predictions, largest difference seen)."""
    faults = {c for c, r in inputs.items() if r.fault is not None}
    preds = drain(bootstrap, topics.predictions)
    counts = pred_sources(preds)
    missing, extra = set(inputs) - faults - set(counts), set(counts) - (set(inputs) - faults)
    assert not missing and not extra, f"gaps {sorted(missing)[:5]} ({len(missing)}), foreign {sorted(extra)[:5]}"
    worst = 0.0
    for p in preds:
        doc = p.json()
        forecast, std, score = ref[(doc["source"]["partition"], doc["source"]["offset"])]
        assert (doc["score"] is None) == (score is None), (doc, score)
        diffs = [np.abs(np.subtract(doc["forecast"], forecast)).max(),
                 np.abs(np.subtract(doc["forecast_std"], std)).max(),
                 abs(doc["score"] - score) if score is not None else 0.0]
        worst = max(worst, *map(float, diffs))
        assert max(diffs) <= TOLERANCE, f"prediction for {doc['source']} differs by {max(diffs)} from the reference"
    dlq = drain(bootstrap, topics.dlq)
    assert set(dlq_sources(dlq, topics.input)) == faults, "a fault without a dead letter (or a valid one with)"
    check_dead_letters(dlq, inputs, topics.input)
    return sum(counts.values()) - len(counts), worst


# -------------------------------------------------------------------------------------------- (a)
def test_sigkill_at_random_moments_loses_nothing_and_predicts_as_the_reference(
        kafka_bootstrap: str, topics: Topics, trained_model: Path, tmp_path: Path,
        processes: list[subprocess.Popen[str]], group: str) -> None:
    t0, rng = time.monotonic(), random.Random(SEED)
    sim = spawn(simulate_cmd(kafka_bootstrap, topics, tmp_path, "--devices", "100", "--events", "20000",
                             "--malformed", "15", "--anomaly-rate", "10", "--seed", "29"), tmp_path / "sim.log",
                processes)
    inputs = produced(kafka_bootstrap, topics, sim, tmp_path / "sim.log")
    total = len(inputs)
    ref = reference(inputs, topics.input, trained_model)
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    at_kill: list[int] = []
    try:
        for life, fraction in enumerate(sorted(rng.uniform(0.1, 0.8) for _ in range(KILLS))):
            log = tmp_path / f"worker-{life}.log"
            proc = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "300", *ALO),
                         log, processes, ENV)
            # capped at the input's end: a fast worker may have committed it all before its predecessor's kill
            wait_for(probe, topics.input,
                     min(total, max(int(fraction * total), (at_kill[-1] if at_kill else 0) + 1000)), proc, log)
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment: batches in flight, commits pending
            proc.kill()
            proc.wait(timeout=30)
            at_kill.append(committed_total(probe, topics.input))
        log = tmp_path / "worker-final.log"
        final = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "5", *ALO),
                      log, processes, ENV)
        rc, stats = finish(final, log)
        assert rc == 0 and stats["balanced"], log.read_text()[-4000:]
        assert committed_total(probe, topics.input) == total
    finally:
        probe.close()
    for life in range(1, KILLS):  # every restart found the state its predecessor left in the changelog
        assert restored_counts(tmp_path / f"worker-{life}.log")[0] > 0
    duplicates, worst = check_at_least_once(kafka_bootstrap, topics, inputs, ref)
    print(f"\nkilled at committed {at_kill}/{total}; final run {json.dumps(stats)}; {duplicates} duplicate "
          f"prediction(s); max |diff| vs reference {worst:.2e}; test {time.monotonic() - t0:.1f} s")


# -------------------------------------------------------------------------------------------- (b)
def test_worker_joining_and_leaving_hands_over_without_reprocessing(
        kafka_bootstrap: str, topics: Topics, trained_model: Path, tmp_path: Path,
        processes: list[subprocess.Popen[str]], group: str) -> None:
    run = join_and_leave(kafka_bootstrap, topics, trained_model, tmp_path, processes, group, events=12_000,
                         seed=37, overlap=2000, worker_args=ALO)
    # Pending batches are settled before each revocation, so neither worker skipped a replayed reading.
    assert Counter(s["skipped_replayed"] for s in (run.stats_a, run.stats_b)) == Counter({0: 2})
    worst = check_exactly_once(kafka_bootstrap, topics, run.inputs, reference(run.inputs, topics.input,
                                                                             trained_model))
    print(f"\na {json.dumps(run.stats_a)}; b {json.dumps(run.stats_b)}; max |diff| vs reference {worst:.2e}")
