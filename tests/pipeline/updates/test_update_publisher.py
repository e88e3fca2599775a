"""The trainer's transactional update publisher (liquidstream.pipeline.updates.publisher) and what fencing does to the
trainer
loop and the ``train-worker`` command, with fake clients (real broker: tests/integration/test_trainer_fencing.py)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from liquidstream.pipeline.cli import entry as cli
from liquidstream.pipeline.cli import train as cli_train
from liquidstream.pipeline.errors import KafkaDeliveryError, PipelineError, TrainerFenced
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.publisher import UpdatePublisher, publisher_config, trainer_transactional_id
from liquidstream.pipeline.updates.record import MAX_RECORD_BYTES, UpdateRecord, build_record
from liquidstream.pipeline.updates.trainer import EXIT_FENCED
from tests.pipeline.updates.test_train_worker import (
    KEY,
    SETTINGS,
    Decision,
    FakeLearner,
    UpdatesProducer,
    _final,
    _readings,
    _trainer,
    _weights,
)


def _record(seq: int) -> UpdateRecord:
    return build_record(_weights(seq), FakeLearner([]).model.config(), seq=seq, lineage="lin", signing_key=KEY)


def _publisher(**fake: Any) -> tuple[UpdatePublisher, UpdatesProducer]:
    producer = UpdatesProducer([], **fake)
    return UpdatePublisher(SETTINGS, producer=producer), producer  # type: ignore[arg-type]


def test_transactional_id_is_shared_by_every_trainer_of_a_lineage_and_only_by_them() -> None:
    base = Settings(model_updates_topic="mu", model_lineage="pumps")
    assert trainer_transactional_id(base) == "liquidstream-trainer-mu-pumps"
    # Another group, worker id or serving-worker prefix is still the same lineage: it must fence.
    same = base.model_copy(update={"group_id": "other", "worker_id": "w2", "transactional_id_prefix": "p"})
    assert trainer_transactional_id(same) == trainer_transactional_id(base)
    for other in ({"model_lineage": "fans"}, {"model_updates_topic": "mu2"}):
        assert trainer_transactional_id(base.model_copy(update=other)) != trainer_transactional_id(base)
    # A pass-through property cannot replace the id (or turn idempotence off): fencing would be lost.
    conf = publisher_config(base.model_copy(update={"kafka_config": {"transactional.id": "x",
                                                                     "enable.idempotence": "false"}}))
    assert conf["transactional.id"] == "liquidstream-trainer-mu-pumps" and conf["enable.idempotence"] is True
    assert conf["acks"] == "all" and conf["message.max.bytes"] == MAX_RECORD_BYTES


def test_each_publish_is_one_transaction_after_start() -> None:
    publisher, producer = _publisher()
    with pytest.raises(PipelineError, match="before start"):  # the seq read before fencing is not safe
        publisher.publish(_record(1))
    assert producer.calls == []
    publisher.start()
    publisher.start()  # idempotent: the CLI starts it, TrainWorker.run() makes sure
    publisher.publish(_record(1))
    publisher.publish(_record(2))
    assert producer.calls == ["init", "begin", "produce", "commit", "begin", "produce", "commit"]
    assert [r[1] for r in producer.committed] == [b"lin", b"lin"]


def test_fenced_publisher_raises_and_never_publishes_again() -> None:
    publisher, producer = _publisher(fenced_from=2)
    publisher.start()
    publisher.publish(_record(1))
    with pytest.raises(TrainerFenced) as info:
        publisher.publish(_record(2))
    assert "'lin'" in str(info.value) and "updates" in str(info.value)
    assert (info.value.lineage, info.value.topic) == ("lin", "updates")
    assert info.value.transactional_id == "liquidstream-trainer-updates-lin"
    assert producer.calls[-2:] == ["commit", "purge"]  # whatever was still queued never leaves
    calls = list(producer.calls)
    with pytest.raises(TrainerFenced):
        publisher.publish(_record(3))
    publisher.close()  # a fenced producer has no transaction to abort
    assert producer.calls == calls and len(producer.committed) == 1


def test_aborted_transaction_publishes_nothing_and_the_next_one_can() -> None:
    publisher, producer = _publisher(fail=True)
    publisher.start()
    with pytest.raises(KafkaDeliveryError, match="seq 1 not published"):
        publisher.publish(_record(1))
    assert producer.calls[-1] == "abort" and producer.committed == []
    producer.fail = False
    publisher.publish(_record(2))
    assert len(producer.committed) == 1


def test_a_retriable_commit_is_retried() -> None:
    class Flaky(UpdatesProducer):
        def commit_transaction(self, timeout: float = -1) -> None:
            if "retry" not in self.calls:
                self.calls.append("retry")
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))
            super().commit_transaction(timeout)

    producer = Flaky([])
    publisher = UpdatePublisher(SETTINGS, producer=producer)  # type: ignore[arg-type]
    publisher.start()
    publisher.publish(_record(1))
    assert producer.calls == ["init", "begin", "produce", "retry", "commit"] and len(producer.committed) == 1


def test_fenced_trainer_exits_3_adopts_nothing_and_leaves_its_offsets(capsys: pytest.CaptureFixture[str]) -> None:
    learner = FakeLearner([Decision(True, "accepted", _weights(1)), Decision(True, "accepted", _weights(2))])
    worker, consumer, producer = _trainer(learner, [_readings(0, 0, 2), _readings(0, 2, 3), _readings(0, 5, 2)],
                                          fenced_from=2)
    assert worker.run() == EXIT_FENCED
    assert producer.calls[0] == "init"  # run() started the publisher
    assert len(producer.committed) == 1 and len(consumer.batches) == 1  # stopped at once
    assert [e for e in learner.events if e.startswith("adopt")] == [f"adopt:{worker.learner.version}"]
    assert consumer.commits == [{("readings", 0): 2}] and consumer.closed
    final = _final(capsys)
    assert (final["exit_code"], final["published"], final["seq"]) == (EXIT_FENCED, 1, 5)


def test_cli_fences_before_reading_the_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    class Recorder:
        def __init__(self, settings: Settings) -> None:
            events.append(f"publisher {trainer_transactional_id(settings)}")

        def start(self) -> None:
            events.append("init_transactions")

    monkeypatch.setattr("liquidstream.pipeline.updates.publisher.UpdatePublisher", Recorder)
    def read_topic(*_: Any) -> tuple[None, str, int]:
        events.append("read topic")
        return None, "v", 7

    monkeypatch.setattr(cli_train, "starting_point", read_topic)
    publisher, _, version, seq = cli_train.fenced_start(SETTINGS, None, KEY)
    assert isinstance(publisher, Recorder) and (version, seq) == ("v", 7)
    assert events == ["publisher liquidstream-trainer-updates-lin", "init_transactions", "read topic"]


def test_train_worker_fenced_at_start_exits_3(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def fenced(settings: Settings, *_: Any) -> None:
        raise TrainerFenced(settings.model_lineage, settings.model_updates_topic, "tid")

    monkeypatch.setenv("LIQUIDSTREAM_MODEL_SIGNING_KEY", KEY.decode())
    monkeypatch.setattr("liquidstream.pipeline.ops.health.preflight", lambda *_: True)
    monkeypatch.setattr(cli_train, "fenced_start", fenced)
    assert cli.main(["train-worker", "--bootstrap", "127.0.0.1:1", "--model-lineage", "pumps"]) == EXIT_FENCED
    assert "trainer of lineage 'pumps' on model-updates was fenced" in capsys.readouterr().err
