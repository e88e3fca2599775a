"""The long input shape (one message per channel) through ``liquidstream run`` on a real broker, with a SIGKILL.

Readings of 4 channels arrive as 4 messages each, channels in random order and interleaved with the device's next
reading; small batches make readings straddle batches.  The first worker is killed (SIGKILL, exactly-once) after a
few commits, the second one finishes.  Every complete reading must have exactly one prediction, every part of an
unfinished reading and every repeated channel exactly one dead letter, and nothing else.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer

from tests.integration.conftest import FAST_GROUP_CONFIG, Topics, committed_total, drain, finish, run_cmd, spawn

pytestmark = pytest.mark.integration

CHANNELS = ("c0", "c1", "c2", "c3")
LONG = ["--shape", "long", "--device-field", "sensor", "--channel-fields", ",".join(CHANNELS)]
# Recent event times: outputs carry them as Kafka timestamps, and the broker's retention (7 days) deletes older ones
T0_MS = (int(time.time()) - 3600) * 1000
ENV = {"LIQUIDSTREAM_KAFKA_CONFIG": FAST_GROUP_CONFIG}  # a killed member leaves the group in 6 s


def long_messages(devices: int, readings: int, seed: int) -> tuple[list[tuple[str, bytes]], set[tuple[str, int]],
                                                                   Counter[str]]:
    """(key, value) per message in send order; the complete readings (device, ts); dead letters due by reason."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    complete, due = set[tuple[str, int]](), Counter[str]()
    for d in range(devices):
        dev, ts, carry = f"dev-{d}", T0_MS, list[tuple[str, bytes]]()
        for r in range(readings):
            ts += rng.randint(500, 1500)  # irregular gaps, ms
            parts = [json.dumps({"sensor": dev, "ts": ts, "channel": c, "value": round(rng.gauss(0, 1), 4)})
                     for c in CHANNELS]
            rng.shuffle(parts)
            if r % 25 == 7 and r < readings - 10:  # never completes: its 3 parts are dead letters once behind
                parts.pop()
                due["incomplete"] += len(parts)
            else:
                complete.add((dev, ts))
            if r % 30 == 11:  # a channel sent twice
                parts.append(parts[0])
                due["duplicate"] += 1
            msgs = [(dev, p.encode()) for p in parts]
            half = len(msgs) // 2  # the previous reading's second half goes out after this one's first half
            out += msgs[:half] + carry
            carry = msgs[half:]
        out += carry
    return out, complete, due


def committed(probe: Consumer, topic: str) -> int:
    """:func:`committed_total`, 0 while a new broker's group coordinator is still loading."""
    try:
        return committed_total(probe, topic)
    except KafkaException:
        return 0


def test_long_shape_from_a_topic_survives_a_sigkill_exactly_once(
        kafka_bootstrap: str, topics: Topics, trained_model: Path, tmp_path: Path,
        processes: list[subprocess.Popen[str]], group: str) -> None:
    messages, complete, due = long_messages(devices=24, readings=60, seed=3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for key, value in messages:
        producer.produce(topics.input, value=value, key=key.encode())
    assert producer.flush(30) == 0
    # assembly_window_s 5: an unfinished reading is given up once its device is 5 s (about 5 readings) further on;
    # the last readings of a device have nothing after them, so the window never passes them: none is unfinished.
    args = [*LONG, "--assembly-window", "5", "--batch-max-messages", "97"]
    log1 = tmp_path / "worker-1.log"
    first = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "60", *args), log1,
                  processes, ENV)
    # read_uncommitted: its committed-offset queries do not wait for the killed worker's open transaction
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                      "isolation.level": "read_uncommitted"})
    try:
        deadline = time.monotonic() + 90
        while committed(probe, topics.input) < len(messages) // 3:
            assert first.poll() is None, f"worker exited early:\n{log1.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no progress:\n{log1.read_text()[-4000:]}"
            time.sleep(0.05)
        first.kill()
        first.wait(10)

        log2 = tmp_path / "worker-2.log"
        second = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "5", *args), log2,
                       processes, ENV)
        rc2, stats2 = finish(second, log2)
        assert rc2 == 0, log2.read_text()[-4000:]
        assert committed(probe, topics.input) == len(messages)
    finally:
        probe.close()

    preds = [r.json() for r in drain(kafka_bootstrap, topics.predictions)]
    got = Counter((p["device_id"], p["ts"]) for p in preds)
    assert set(got) == complete, "a complete reading without prediction, or a prediction of an unfinished one"
    assert max(got.values()) == 1, "a duplicate prediction"
    dlq = drain(kafka_bootstrap, topics.dlq)
    assert Counter(r.headers["ls.error.class"] for r in dlq) == due
    sources = Counter((r.headers["ls.source.partition"], r.headers["ls.source.offset"]) for r in dlq)
    assert max(sources.values()) == 1, "a part dead-lettered twice"
    assert len(complete) * len(CHANNELS) + sum(due.values()) == len(messages)  # every message accounted for
