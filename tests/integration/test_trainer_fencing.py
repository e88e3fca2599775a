"""Fencing a second trainer of one model lineage on a real broker (liquidstream.pipeline.updates.publisher).

Trainer A publishes seq 1; trainer B of the same lineage starts (``init_transactions`` on the lineage's
transactional id) and reads seq 1 as the newest; A's next publish raises :class:`TrainerFenced` and leaves no
record on the topic, not even an uncommitted one; B publishes seq 2 and 3, and a serving worker's
:class:`ModelFollower` adopts A's seq 1 then B's records only, rejecting none.  A transaction A had open when
B started is aborted and never adopted.  A trainer of another lineage on the same topic is not fenced; a
fenced :class:`TrainWorker` exits :data:`EXIT_FENCED`, and so does a real ``liquidstream train-worker`` once
a second one of its lineage started.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import SecretStr

from liquidstream.operators import Forecaster
from liquidstream.pipeline.errors import TrainerFenced
from liquidstream.pipeline.offline.fleet_messages import build_messages, fleet_stream, produce_messages
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.follower import ModelFollower
from liquidstream.pipeline.updates.gate import UpdateGate
from liquidstream.pipeline.updates.publisher import UpdatePublisher
from liquidstream.pipeline.updates.record import ModelUpdate, UpdateRecord, build_record, verify
from liquidstream.pipeline.updates.topic import read_latest, updates_consumer
from liquidstream.pipeline.updates.trainer import EXIT_FENCED
from tests.conftest import MakeTopic
from tests.integration.conftest import FAST_GROUP_CONFIG, cli, drain_messages, finish, spawn
from tests.integration.test_model_updates import TRAINER_ENV
from tests.pipeline.updates.test_train_worker import Decision, FakeLearner, TrainerConsumer, _readings, _weights

pytestmark = pytest.mark.integration
KEY = "integration-fencing-key-0123456789"
LINEAGE = "pumps"
WAIT_S = 30.0  # seconds to wait for the follower to see a record


def _settings(bootstrap: str, topic: str, lineage: str = LINEAGE) -> Settings:
    return Settings(bootstrap=bootstrap, model_updates_topic=topic, model_lineage=lineage,
                    model_signing_key=SecretStr(KEY), group_id=f"fence-{uuid.uuid4().hex[:8]}",
                    input_topic="readings", trainer_interval_s=1e-6, exit_when_idle_s=0.0, ts_min_ms=0)


def _model() -> Forecaster:
    return FakeLearner([]).model  # the architecture the follower serves below


def _record(seq: int, trainer: str, lineage: str = LINEAGE) -> UpdateRecord:
    return build_record(_weights(seq), _model().config(), seq=seq, lineage=lineage, signing_key=KEY.encode(),
                        trainer=trainer)


def _on_topic(bootstrap: str, topic: str) -> list[tuple[str, int, str]]:
    """(lineage, seq, trainer) of every record on the topic, *uncommitted and aborted ones included*."""

    def row(m: Message) -> tuple[str, int, str]:
        env = verify(m.value(), m.headers(), KEY.encode())
        return env.lineage, env.seq, str(env.header["trainer"])

    return drain_messages(bootstrap, topic, row, committed_only=False, partitions=1)


def _latest(settings: Settings) -> tuple[ModelUpdate | None, int]:
    consumer = updates_consumer(settings, "test-read")
    try:
        return read_latest(consumer, settings.model_updates_topic, UpdateGate(KEY.encode(), settings.model_lineage),
                           None)
    finally:
        consumer.close()


def _follow_until(follower: ModelFollower, seq: int) -> list[tuple[int, str | None]]:
    """(seq, trainer) of each update the follower adopts, until it serves ``seq``."""
    served, adopted = _model(), list[tuple[int, str | None]]()
    deadline = time.monotonic() + WAIT_S
    while follower.gate.seq < seq:
        if time.monotonic() > deadline:
            pytest.fail(f"follower at seq {follower.gate.seq}, not {seq}, after {WAIT_S} s: {adopted}")
        update = follower.poll(served)
        if update is None:
            time.sleep(0.1)
            continue
        adopted.append((update.seq, update.trainer))
    return adopted


def test_second_trainer_fences_the_first_and_followers_see_its_updates_only(
        kafka_bootstrap: str, make_topic: MakeTopic) -> None:
    topic = make_topic(1, prefix="model-updates", config={"cleanup.policy": "compact"})
    s = _settings(kafka_bootstrap, topic)
    follower = ModelFollower(s, Metrics(), ensure_topic=lambda: None)
    follower.start()
    try:
        a = UpdatePublisher(s)
        a.start()
        a.publish(_record(1, "A"))
        assert _follow_until(follower, 1) == [(1, "A")]

        b = UpdatePublisher(s)
        b.start()  # fences A
        assert _latest(s)[1] == 1  # read after init_transactions: B numbers on from A's seq 1
        with pytest.raises(TrainerFenced) as info:
            a.publish(_record(2, "A"))
        assert LINEAGE in str(info.value) and topic in str(info.value)
        with pytest.raises(TrainerFenced):  # and it stays fenced
            a.publish(_record(3, "A"))

        b.publish(_record(2, "B"))
        b.publish(_record(3, "B"))
        adopted = _follow_until(follower, 3)
        assert adopted[-1] == (3, "B") and {t for _, t in adopted} == {"B"}, adopted
        assert follower.stats()["rejected"] == 0  # no competing seq ever reached it
        latest, top_seq = _latest(s)
        assert latest is not None and (latest.seq, latest.trainer, top_seq) == (3, "B", 3)
        # Nothing of A's after the fence reached the log at all, not even uncommitted.
        assert _on_topic(kafka_bootstrap, topic) == [(LINEAGE, 1, "A"), (LINEAGE, 2, "B"), (LINEAGE, 3, "B")]
    finally:
        follower.close()


def test_transaction_open_when_the_new_trainer_starts_is_aborted_and_never_adopted(
        kafka_bootstrap: str, make_topic: MakeTopic) -> None:
    topic = make_topic(1, prefix="model-updates", config={"cleanup.policy": "compact"})
    s = _settings(kafka_bootstrap, topic)
    a = UpdatePublisher(s)
    a.start()
    # A is mid-publish: its record is on the log, its transaction not committed yet.
    rec = _record(1, "A")
    a.producer.begin_transaction()
    a.producer.produce(topic, rec.value, rec.key, headers=rec.headers)  # type: ignore[arg-type]
    assert a.producer.flush(30) == 0
    b = UpdatePublisher(s)
    b.start()  # aborts A's open transaction
    with pytest.raises(KafkaException) as info:
        a.producer.commit_transaction(30)
    assert info.value.args[0].code() == KafkaError._FENCED
    assert _latest(s) == (None, 0)  # read_committed: the aborted seq 1 does not count
    b.publish(_record(1, "B"))
    follower = ModelFollower(s, Metrics(), ensure_topic=lambda: None)
    follower.start()
    try:
        assert _follow_until(follower, 1) == [(1, "B")]
        assert follower.stats()["rejected"] == 0
    finally:
        follower.close()
    assert _on_topic(kafka_bootstrap, topic) == [(LINEAGE, 1, "A"), (LINEAGE, 1, "B")]  # A's: aborted


def test_a_trainer_of_another_lineage_is_not_fenced(kafka_bootstrap: str, make_topic: MakeTopic) -> None:
    topic = make_topic(1, prefix="model-updates", config={"cleanup.policy": "compact"})
    pumps, fans = _settings(kafka_bootstrap, topic), _settings(kafka_bootstrap, topic, lineage="fans")
    p = UpdatePublisher(pumps)
    p.start()
    p.publish(_record(1, "P"))
    f = UpdatePublisher(fans)
    f.start()
    f.publish(_record(1, "F", lineage="fans"))
    p.publish(_record(2, "P"))  # not fenced by the other lineage's trainer
    assert _on_topic(kafka_bootstrap, topic) == [(LINEAGE, 1, "P"), ("fans", 1, "F"), (LINEAGE, 2, "P")]
    assert _latest(pumps)[1] == 2 and _latest(fans)[1] == 1


def test_fenced_train_worker_exits_with_its_own_code(kafka_bootstrap: str, make_topic: MakeTopic,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from liquidstream.pipeline.updates.trainer import TrainWorker

    topic = make_topic(1, prefix="model-updates", config={"cleanup.policy": "compact"})
    s = _settings(kafka_bootstrap, topic)
    a = UpdatePublisher(s)
    a.start()
    learner = FakeLearner([Decision(True, "accepted", _weights(7))])
    worker = TrainWorker(s, learner, seq=0, signing_key=KEY.encode(), worker_id="A",
                         consumer=TrainerConsumer([_readings(0, 0, 4)]), publisher=a)  # type: ignore[arg-type]
    UpdatePublisher(s).start()  # trainer B starts while A is running
    assert worker.run() == EXIT_FENCED
    assert learner.version == "v0"  # adopted nothing
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (final["exit_code"], final["published"]) == (EXIT_FENCED, 0)
    assert _on_topic(kafka_bootstrap, topic) == []


def _trainer_cmd(bootstrap: str, readings: str, group: str, model: Path, idle_s: str) -> list[str]:
    return cli("train-worker", "--bootstrap", bootstrap, "--input-topic", readings, "--trainer-group-id", group,
               "--model", str(model), "--device", "cpu", "--interval", "1", "--exit-when-idle", idle_s)


def test_train_worker_command_exits_3_once_a_second_trainer_of_its_lineage_started(
        kafka_bootstrap: str, make_topic: MakeTopic, trained_model: Path, tmp_path: Path,
        processes: list[subprocess.Popen[str]]) -> None:
    topic = make_topic(1, prefix="model-updates", config={"cleanup.policy": "compact"})
    readings, group = make_topic(4, prefix="readings"), f"fence-{uuid.uuid4().hex[:8]}"
    env = TRAINER_ENV | {"LIQUIDSTREAM_MODEL_SIGNING_KEY": KEY, "LIQUIDSTREAM_MODEL_UPDATES_TOPIC": topic,
                         "LIQUIDSTREAM_MODEL_LINEAGE": LINEAGE, "LIQUIDSTREAM_KAFKA_CONFIG": FAST_GROUP_CONFIG}
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = spawn(_trainer_cmd(kafka_bootstrap, readings, group, trained_model, "60"), log_a, processes, env)
    deadline = time.monotonic() + 60
    while "learning from" not in log_a.read_text():  # A started (and read the topic) before B
        if a.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"trainer A did not start; log:\n{log_a.read_text()[-4000:]}")
        time.sleep(0.3)
    b = spawn(_trainer_cmd(kafka_bootstrap, readings, group, trained_model, "3"), log_b, processes, env)
    rc, final_b = finish(b, log_b, timeout_s=120)  # started (fencing A), saw no input, left
    assert rc == 0 and final_b["published"] == 0, final_b
    # Now A gets readings, trains a candidate the guards accept, and tries to publish it.
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    stream = fleet_stream(30, 1500, seed=5, anomaly_rate=0.0)
    produce_messages(producer, readings, build_messages(stream, now_ms=time.time_ns() // 1_000_000))
    assert producer.flush(30) == 0
    rc, final_a = finish(a, log_a, timeout_s=120)
    assert rc == EXIT_FENCED and final_a["exit_code"] == EXIT_FENCED and final_a["published"] == 0, final_a
    assert f"trainer of lineage '{LINEAGE}' on {topic} was fenced" in log_a.read_text()
    assert _on_topic(kafka_bootstrap, topic) == []
