"""The trainer loop (liquidstream.pipeline.updates.trainer) with fake Kafka clients: what it publishes, signs, adopts
and commits;
one run with the real OnlineLearner; the ``train-worker`` command line."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from liquidstream.operators import Forecaster, OperatorSettings
from liquidstream.operators.model_io import model_version
from liquidstream.operators.online.config import OnlineSettings
from liquidstream.operators.online.learner import OnlineLearner
from liquidstream.pipeline.cli import build_parser
from liquidstream.pipeline.cli import entry as cli
from liquidstream.pipeline.cli.entry import _settings
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.publisher import UpdatePublisher
from liquidstream.pipeline.updates.record import decode, verify
from liquidstream.pipeline.updates.trainer import TrainWorker

KEY = b"0123456789abcdef-test-key"
SETTINGS = Settings(exit_when_idle_s=0.0, trainer_interval_s=1e-6, ts_min_ms=0, input_topic="readings",
                    model_updates_topic="updates", model_lineage="lin")


@dataclass
class Decision:
    accepted: bool
    reason: str
    state_dict: dict[str, torch.Tensor] | None
    figures: dict[str, float] = field(default_factory=dict)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Forecaster(n_channels=2, hidden_size=4, cell="cfc")
    return {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}


class FakeLearner:
    """Scripted decisions; records what the trainer fed and adopted (and when, relative to publishing)."""

    def __init__(self, decisions: list[Decision], rollbacks: list[Decision | None] | None = None,
                 events: list[str] | None = None) -> None:
        self._model = Forecaster(n_channels=2, hidden_size=4, cell="cfc")
        self._version = "v0"
        self.decisions, self.rollbacks = decisions, rollbacks or []
        self.events = events if events is not None else []
        self.observed: list[tuple[list[str], np.ndarray, np.ndarray]] = []

    @property
    def model(self) -> Forecaster:
        return self._model

    @property
    def version(self) -> str:
        return self._version

    @property
    def buffer_windows(self) -> int:
        return 5

    @property
    def memory_bytes(self) -> int:
        return 1234

    def observe(self, device_ids: Sequence[str], ts_ms: np.ndarray, values: np.ndarray) -> object:
        self.observed.append((list(device_ids), ts_ms, values))
        return None

    def learn(self) -> Decision:
        self.events.append("learn")
        return self.decisions.pop(0)

    def check_rollback(self) -> Decision | None:
        return self.rollbacks.pop(0) if self.rollbacks else None

    def adopt(self, state_dict: dict[str, torch.Tensor], version: str) -> None:
        self.events.append(f"adopt:{version}")
        self._model.load_state_dict(state_dict)
        self._version = version


class TrainerConsumer:
    def __init__(self, batches: list[list[Message]]) -> None:
        self.batches, self.commits, self.closed = batches, list[dict[tuple[str, int], int]](), False
        self.subscribed: list[str] = []

    def subscribe(self, topics: list[str], **_callbacks: Any) -> None:
        self.subscribed = topics

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def close(self) -> None:
        self.closed = True


class UpdatesProducer:
    """Transactional producer: ``fail`` aborts every transaction (delivery timed out); from the
    ``fenced_from``-th commit on (1-based) a newer trainer has fenced this one."""

    def __init__(self, events: list[str], fail: bool = False, fenced_from: int | None = None) -> None:
        self.events, self.fail, self.fenced_from = events, fail, fenced_from
        self.sent, self.committed, self.queued = list[tuple[Any, ...]](), list[tuple[Any, ...]](), list[Any]()
        self.calls: list[str] = []

    def init_transactions(self, timeout: float = -1) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        self.calls.append("produce")
        self.sent.append((topic, key, value, headers))
        self.queued.append(on_delivery)

    def commit_transaction(self, timeout: float = -1) -> None:
        self.calls.append("commit")
        if self.fenced_from is not None and self.calls.count("commit") >= self.fenced_from:
            raise KafkaException(KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True))
        for callback in self.queued:
            callback(KafkaError(KafkaError._MSG_TIMED_OUT) if self.fail else None, Message(topic="updates"))
        self.queued.clear()
        if self.fail:
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, "timed out", txn_requires_abort=True))
        self.committed.append(self.sent[-1])
        self.events.append("published")

    def abort_transaction(self, timeout: float = -1) -> None:
        self.calls.append("abort")
        self.queued.clear()

    def poll(self, timeout: float = -1) -> int:
        return 0

    def purge(self) -> None:
        self.calls.append("purge")
        self.queued.clear()


def _readings(partition: int, start: int, n: int, devices: Sequence[str] = ("a", "b")) -> list[Message]:
    now = time.time_ns() // 1_000_000
    out = []
    for i in range(start, start + n):
        dev = devices[i % len(devices)]
        value = json.dumps({"device_id": dev, "ts": now - 100_000 + 1000 * i, "values": [np.sin(i / 3.0), 1.0]})
        out.append(Message(topic="readings", partition=partition, offset=i, key=dev.encode(), value=value.encode()))
    return out


def _trainer(learner: Any, batches: list[list[Message]], *, fail: bool = False, max_updates: int | None = None,
             seq: int = 4, settings: Settings = SETTINGS,
             fenced_from: int | None = None) -> tuple[TrainWorker, TrainerConsumer, UpdatesProducer]:
    consumer = TrainerConsumer(batches)
    producer = UpdatesProducer(getattr(learner, "events", []), fail, fenced_from)
    worker = TrainWorker(settings, learner, seq=seq, signing_key=KEY, worker_id="trainer-1",
                         consumer=consumer,  # type: ignore[arg-type]
                         publisher=UpdatePublisher(settings, producer=producer),  # type: ignore[arg-type]
                         max_updates=max_updates)
    return worker, consumer, producer


def _final(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_accepted_candidate_is_signed_published_then_adopted(capsys: pytest.CaptureFixture[str]) -> None:
    weights = _weights(1)
    learner = FakeLearner([Decision(True, "accepted", weights, {"candidate_val_mse": 0.25})])
    worker, consumer, producer = _trainer(learner, [_readings(0, 0, 6) + _readings(1, 10, 2)])
    assert worker.run() == 0
    (topic, key, value, headers), = producer.sent
    assert (topic, key) == ("updates", b"lin")
    update = decode(verify(value, headers, KEY))
    assert update.seq == 5 and update.parent_version == "v0" and update.trainer == "trainer-1"
    assert update.validation == {"candidate_val_mse": 0.25, "rollback": 0.0}
    assert all(torch.equal(update.model.state_dict()[k], v) for k, v in weights.items())
    assert learner.events == ["learn", "published", f"adopt:{update.version}"]  # adopt only once acknowledged
    assert [len(ids) for ids, _, _ in learner.observed] == [8]
    assert consumer.commits[0] == {("readings", 0): 6, ("readings", 1): 12} and consumer.closed
    final = _final(capsys)
    assert (final["published"], final["seq"], final["version"], final["exit_code"]) == (1, 5, update.version, 0)
    assert final["decisions"] == {"accepted": 1} and final["observed"] == 8 and final["consumed"] == 8


def test_rejected_candidates_publish_nothing_and_invalid_readings_are_skipped(
        capsys: pytest.CaptureFixture[str]) -> None:
    learner = FakeLearner([Decision(False, "no_improvement", None), Decision(False, "buffer_too_small", None)])
    garbage = Message(topic="readings", partition=0, offset=2, key=b"a", value=b"{not json")
    worker, consumer, producer = _trainer(learner, [_readings(0, 0, 2) + [garbage], _readings(0, 3, 2)])
    assert worker.run() == 0
    assert producer.sent == [] and learner.version == "v0"
    assert learner.events == ["learn", "learn"]
    final = _final(capsys)
    assert final["decisions"] == {"buffer_too_small": 1, "no_improvement": 1}
    assert (final["consumed"], final["observed"], final["rejected"], final["published"]) == (5, 4, 1, 0)
    assert consumer.commits == [{("readings", 0): 3}, {("readings", 0): 5}]


def test_rollback_publishes_the_last_good_weights_as_a_new_seq(capsys: pytest.CaptureFixture[str]) -> None:
    good = _weights(2)
    learner = FakeLearner([], rollbacks=[Decision(True, "rollback", good, {"live_mse_after": 3.0})])
    worker, _, producer = _trainer(learner, [_readings(0, 0, 4)], seq=11)
    assert worker.run() == 0
    update = decode(verify(producer.sent[0][2], producer.sent[0][3], KEY))
    assert update.seq == 12 and update.validation["rollback"] == 1.0 and "learn" not in learner.events
    assert learner.version == update.version == model_version(update.model)
    assert _final(capsys)["decisions"] == {"rollback": 1}


def test_max_updates_stops_after_publishing(capsys: pytest.CaptureFixture[str]) -> None:
    learner = FakeLearner([Decision(True, "accepted", _weights(3)), Decision(True, "accepted", _weights(4))])
    worker, consumer, producer = _trainer(learner, [_readings(0, 0, 2), _readings(0, 2, 2)], max_updates=1)
    assert worker.run() == 0
    assert len(producer.sent) == 1 and len(consumer.batches) == 1  # the second batch was never fetched
    assert _final(capsys)["published"] == 1


def test_failed_publish_exits_non_zero_and_adopts_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    learner = FakeLearner([Decision(True, "accepted", _weights(5))])
    worker, _, _ = _trainer(learner, [_readings(0, 0, 2)], fail=True)
    assert worker.run() == 2
    assert learner.version == "v0" and not any(e.startswith("adopt") for e in learner.events)
    assert _final(capsys)["exit_code"] == 2


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small tensors on a shared box: more intra-op threads only spin (see Settings.torch_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_real_learner_publishes_the_model_it_then_serves(capsys: pytest.CaptureFixture[str], device: str) -> None:
    """The real OnlineLearner (guards off so that it accepts): the record is exactly the learner's new model."""
    online = OnlineSettings.unguarded(window=8, min_windows=4, batch_windows=8, steps_per_update=3)
    settings = SETTINGS.model_copy(update={"online": online})
    torch.manual_seed(0)
    learner = OnlineLearner(Forecaster(n_channels=2, hidden_size=4, cell="cfc"), OperatorSettings(), online,
                            device=device, model_version="v0")
    worker, _, producer = _trainer(learner, [_readings(0, 0, 160, devices=("a", "b", "c", "d"))],
                                   settings=settings, seq=0)
    assert worker.run() == 0
    (_, _, value, headers), = producer.sent
    update = decode(verify(value, headers, KEY))
    assert update.seq == 1 and update.parent_version == "v0"
    assert learner.version == update.version == model_version(learner.model)
    assert update.validation["train_windows"] >= 4
    assert _final(capsys)["published"] == 1


# ------------------------------------------------------------------------------------------- CLI
def test_train_worker_flags_map_onto_settings() -> None:
    args = build_parser().parse_args(["train-worker", "--bootstrap", "b:1", "--input-topic", "in", "--interval", "5",
                                     "--model-updates-topic", "mu", "--model-lineage", "pumps",
                                     "--trainer-group-id", "tg", "--exit-when-idle", "3", "--max-updates", "2"])
    s = _settings(args)
    assert (s.bootstrap, s.input_topic, s.trainer_interval_s, s.model_updates_topic, s.model_lineage) == \
        ("b:1", "in", 5.0, "mu", "pumps")
    assert s.trainer_group == "tg" and s.exit_when_idle_s == 3.0 and args.max_updates == 2
    assert Settings(group_id="g").trainer_group == "g-trainer"
    assert _settings(build_parser().parse_args(["train-worker", "--exit-when-idle-s", "4"])).exit_when_idle_s == 4.0
    for bad in (["--interval", "0"], ["--max-updates", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train-worker", *bad])


def test_online_settings_nest_under_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQUIDSTREAM_ONLINE__WINDOW", "16")
    monkeypatch.setenv("LIQUIDSTREAM_ONLINE__GUARD_DRIFT", "false")
    monkeypatch.setenv("LIQUIDSTREAM_MODEL_SIGNING_KEY", "a-key-of-twenty-bytes")
    s = Settings()
    assert (s.online.window, s.online.guard_drift, s.online.guard_alerts) == (16, False, True)
    assert s.model_signing_key is not None and "twenty" not in repr(s)  # a SecretStr: never printed


def test_train_worker_refuses_to_start_without_a_signing_key(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIQUIDSTREAM_MODEL_SIGNING_KEY", raising=False)
    assert cli.main(["train-worker", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "LIQUIDSTREAM_MODEL_SIGNING_KEY" in capsys.readouterr().err
    monkeypatch.setenv("LIQUIDSTREAM_MODEL_SIGNING_KEY", "short")
    assert cli.main(["train-worker", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err
