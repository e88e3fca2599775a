"""Online fine-tuning end to end on a real broker: ``liquidstream train-worker`` publishes a signed update, a
serving ``liquidstream run`` adopts it between batches (its predictions carry the new version from then on),
and a forged update (wrong key), an unsigned one and a replay of the adopted one are rejected and counted.

The stream is produced in three parts, each only after the worker has predicted the previous one, so every
part is served by a known model: part 1 by the starting model, parts 2 and 3 by the update.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from liquidstream.operators.model_io import load_model
from liquidstream.pipeline.offline.fleet_messages import build_messages, fleet_stream, produce_messages
from liquidstream.pipeline.updates.record import H_SIGNATURE, UpdateRecord, build_record, decode, verify
from tests.conftest import MakeTopic
from tests.integration.conftest import (
    FAST_GROUP_CONFIG,
    Rec,
    Topics,
    cli,
    drain,
    drain_messages,
    finish,
    run_cmd,
    spawn,
)

pytestmark = pytest.mark.integration
KEY = "integration-signing-key-0123456789"
WRONG_KEY = b"attacker-key-0123456789abcdef"
DEVICES, EVENTS = 30, 3000
PART_ENDS = (1500, 2250, 3000)  # stream positions where parts 1, 2 and 3 end
WAIT_S = 60.0  # seconds to wait for one expected effect (predictions, a log line)
#: Settings that make the trainer accept its first candidate quickly: a short window, few steps, and the
#: validation guard off (its margin is exercised in tests/operators; here the point is the Kafka path).
TRAINER_ENV = {"LIQUIDSTREAM_ONLINE__WINDOW": "16", "LIQUIDSTREAM_ONLINE__MIN_WINDOWS": "16",
               "LIQUIDSTREAM_ONLINE__BATCH_WINDOWS": "16", "LIQUIDSTREAM_ONLINE__STEPS_PER_UPDATE": "5",
               "LIQUIDSTREAM_ONLINE__GUARD_VALIDATION": "false", "LIQUIDSTREAM_TORCH_THREADS": "1"}


def _wait(what: str, check: object, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {WAIT_S} s; log:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list[tuple[str, bytes]] | None]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value, headers in records:
        producer.produce(topic, value, key, headers=headers)
    assert producer.flush(30) == 0


def _read_updates(bootstrap: str, topic: str) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """Every record of the one-partition updates topic, raw headers included."""
    return drain_messages(bootstrap, topic, lambda m: (m.key() or b"", m.value() or b"",
                                                       [(k, v) for k, v in m.headers() or () if v is not None]),
                          partitions=1)


def test_trainer_update_is_adopted_and_forged_or_replayed_updates_are_rejected(
        kafka_bootstrap: str, topics: Topics, make_topic: MakeTopic, trained_model: Path, tmp_path: Path,
        processes: list[subprocess.Popen[str]], group: str) -> None:
    updates = make_topic(1, prefix="model-updates", config={"cleanup.policy": "compact"})
    stream = fleet_stream(DEVICES, EVENTS, seed=5, anomaly_rate=0.0)
    messages = build_messages(stream, now_ms=time.time_ns() // 1_000_000, max_payload_bytes=64 * 1024)
    part_of = {(str(d), int(t)): next(k for k, end in enumerate(PART_ENDS) if i < end)
               for i, (d, t) in enumerate(zip(stream.device_ids, stream.ts_ms, strict=True))}
    base_version = load_model(trained_model)[1]["version"]
    env = {"LIQUIDSTREAM_MODEL_SIGNING_KEY": KEY, "LIQUIDSTREAM_MODEL_UPDATES_TOPIC": updates,
           "LIQUIDSTREAM_KAFKA_CONFIG": FAST_GROUP_CONFIG}

    def send_part(k: int) -> None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        produce_messages(producer, topics.input, messages[(PART_ENDS[k - 1] if k else 0):PART_ENDS[k]])
        assert producer.flush(30) == 0

    def predictions() -> list[Rec]:
        return drain(kafka_bootstrap, topics.predictions)

    worker_log = tmp_path / "worker.log"
    worker = spawn(run_cmd(kafka_bootstrap, topics, group, trained_model, "--exit-when-idle", "120"), worker_log,
                   processes, env)
    send_part(0)
    _wait("predictions of part 1", lambda: len(predictions()) >= PART_ENDS[0], worker_log)

    # The trainer learns from part 1 (its own group) and exits once it has published one update.
    trainer_log = tmp_path / "trainer.log"
    trainer = spawn(cli("train-worker", "--bootstrap", kafka_bootstrap, "--input-topic", topics.input,
                        "--trainer-group-id", f"{group}-trainer", "--model", str(trained_model), "--device", "cpu",
                        "--interval", "1", "--max-updates", "1", "--exit-when-idle", "60"),
                    trainer_log, processes, env | TRAINER_ENV)
    rc, trained = finish(trainer, trainer_log, timeout_s=120)
    assert rc == 0 and trained["published"] == 1 and trained["seq"] == 1, trained
    new_version = trained["version"]
    assert new_version != base_version
    _wait("adoption", lambda: "adopting model update seq 1" in worker_log.read_text(), worker_log)
    send_part(1)
    _wait("predictions of part 2", lambda: len(predictions()) >= PART_ENDS[1], worker_log)

    # The record on the topic verifies with the key and names the starting model as its parent.
    (published,) = _read_updates(kafka_bootstrap, updates)
    key, value, raw_headers = published
    assert key == b"forecaster" and any(name == H_SIGNATURE for name, _ in raw_headers)
    update = decode(verify(value, raw_headers, KEY.encode()))
    assert (update.seq, update.version, update.parent_version) == (1, new_version, base_version)

    # Attacks: a newer seq signed with the wrong key, the same unsigned, and the adopted record replayed.
    forged: UpdateRecord = build_record(update.model.state_dict(), update.model.config(), seq=7,
                                        lineage=update.lineage, signing_key=WRONG_KEY)
    unsigned = build_record(update.model.state_dict(), update.model.config(), seq=8, lineage=update.lineage,
                            signing_key=None)
    _produce(kafka_bootstrap, updates, [(forged.key, forged.value, forged.headers),
                                        (unsigned.key, unsigned.value, unsigned.headers),
                                        (key, value, raw_headers)])
    _wait("three rejections", lambda: worker_log.read_text().count("rejected model update") >= 3, worker_log)
    send_part(2)
    _wait("predictions of part 3", lambda: len(predictions()) >= PART_ENDS[2], worker_log)
    worker.send_signal(signal.SIGTERM)
    rc, final = finish(worker, worker_log)
    assert rc == 0 and final["balanced"] and final["model_version"] == new_version
    assert final["model_updates"] == {"adopted": 1, "rejected": 3, "superseded": 0, "seq": 1,
                                      "rejected_by_reason": {"bad_signature": 1, "stale": 1, "unsigned": 1}}

    served: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    for p in predictions():
        doc = p.json()
        served[part_of[(doc["device_id"], doc["ts"])]].add(doc["model_version"])
    assert served == {0: {base_version}, 1: {new_version}, 2: {new_version}}
    for log in (worker_log, trainer_log):  # the signing key is a secret: redacted from every log line
        assert KEY not in log.read_text(), log
