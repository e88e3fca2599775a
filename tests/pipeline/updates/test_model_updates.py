"""Signed model-update records (liquidstream.pipeline.updates.record), the gate and follower
(liquidstream.pipeline.updates.follower), and the
serving worker's adoption between batches (liquidstream.pipeline.kafka.worker) with fake clients."""

from __future__ import annotations

import io
import json
import pickle
import struct
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from confluent_kafka import KafkaError, Message
from pydantic import SecretStr

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.model_io import model_version
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates import record as mr
from liquidstream.pipeline.updates.follower import ModelFollower
from liquidstream.pipeline.updates.gate import UpdateGate
from liquidstream.pipeline.updates.record import (
    H_SIGNATURE,
    MAGIC,
    RejectReason,
    UpdateRecord,
    UpdateRejected,
    build_record,
    decode,
    header_value,
    sign,
    signing_key,
    verify,
)
from liquidstream.pipeline.updates.topic import read_latest
from tests.pipeline.kafka.test_worker_unit import FakeConsumer, FakeProducer, _now_batch, _Worker

KEY = b"0123456789abcdef-test-key"
OTHER_KEY = b"fedcba9876543210-attacker"
LINEAGE = "forecaster"


def _model(seed: int, hidden: int = 4, channels: int = 2, cell: str = "cfc") -> Forecaster:
    torch.manual_seed(seed)
    model = Forecaster(n_channels=channels, hidden_size=hidden, cell=cell)
    with torch.no_grad():  # the head's last layer starts at zero: make every seed's weights distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _record(model: Forecaster, seq: int, key: bytes | None = KEY, lineage: str = LINEAGE) -> UpdateRecord:
    return build_record(model.state_dict(), model.config(), seq=seq, lineage=lineage, signing_key=key,
                        parent_version="parent", validation={"candidate_val_mse": 0.5}, trainer="t1")


def _reason(value: bytes | None, headers: Any, key: bytes | None = KEY) -> RejectReason:
    with pytest.raises(UpdateRejected) as info:
        decode(verify(value, headers, key))
    return info.value.reason


def _resigned(value: bytes) -> list[tuple[str, bytes]]:
    """Headers with a valid signature over ``value``: the trainer's key signed something bad."""
    return [(H_SIGNATURE, sign(value, KEY).encode())]


def _value(header: dict[str, Any], weights: bytes) -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + weights


# ------------------------------------------------------------------------------------------- the record
def test_round_trip_keeps_weights_version_and_lineage_fields() -> None:
    model = _model(1)
    rec = _record(model, seq=7)
    update = decode(verify(rec.value, rec.headers, KEY))
    assert rec.key == LINEAGE.encode() and rec.seq == 7 and rec.version == model_version(model)
    assert (update.seq, update.version, update.parent_version, update.lineage, update.trainer) == \
        (7, model_version(model), "parent", LINEAGE, "t1")
    assert update.validation == {"candidate_val_mse": 0.5} and update.created_at_ms > 1_700_000_000_000
    for name, tensor in model.state_dict().items():
        assert torch.equal(update.model.state_dict()[name], tensor), name
    assert header_value(rec.headers, mr.H_SEQ) == b"7"
    assert header_value(rec.headers, mr.H_VERSION) == rec.version.encode()


def test_changing_any_byte_of_header_or_weights_breaks_the_signature() -> None:
    rec = _record(_model(2), seq=1)
    hlen = struct.unpack_from(">I", rec.value, len(MAGIC))[0]
    assert len(rec.value) > len(MAGIC) + 4 + hlen + 100  # header and weights both present
    for i in range(len(rec.value)):
        forged = bytearray(rec.value)
        forged[i] ^= 0x01
        with pytest.raises(UpdateRejected) as info:
            verify(bytes(forged), rec.headers, KEY)
        assert info.value.reason == RejectReason.BAD_SIGNATURE, i
    assert _reason(rec.value + b"\x00", rec.headers) == RejectReason.BAD_SIGNATURE  # appended bytes too
    assert _reason(rec.value[:-1], rec.headers) == RejectReason.BAD_SIGNATURE


def test_wrong_key_missing_signature_and_missing_key_are_rejected() -> None:
    model = _model(3)
    assert _reason(_record(model, 1, key=OTHER_KEY).value, _record(model, 1, key=OTHER_KEY).headers) == \
        RejectReason.BAD_SIGNATURE
    unsigned = _record(model, 1, key=None)
    assert header_value(unsigned.headers, H_SIGNATURE) is None
    assert _reason(unsigned.value, unsigned.headers) == RejectReason.UNSIGNED
    signed = _record(model, 1)
    assert _reason(signed.value, signed.headers, key=None) == RejectReason.NO_KEY
    assert _reason(signed.value, [(H_SIGNATURE, b"not hex at all")]) == RejectReason.BAD_SIGNATURE


def test_signed_but_inconsistent_weights_are_tampered() -> None:
    """A record whose weights do not hash to the version it names (signed: e.g. a buggy or subverted trainer)."""
    genuine = _record(_model(4), seq=1)
    other = _record(_model(5), seq=1)
    head_len = struct.unpack_from(">I", genuine.value, len(MAGIC))[0]
    header = genuine.value[len(MAGIC) + 4:len(MAGIC) + 4 + head_len]
    other_weights = other.value[len(MAGIC) + 4 + struct.unpack_from(">I", other.value, len(MAGIC))[0]:]
    swapped = MAGIC + struct.pack(">I", head_len) + header + other_weights
    assert _reason(swapped, _resigned(swapped)) == RejectReason.TAMPERED


def test_decoding_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(6)
    rec = _record(model, seq=1)
    header = json.loads(rec.value[len(MAGIC) + 4:len(MAGIC) + 4 + struct.unpack_from(">I", rec.value, 8)[0]])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # a pickle (zip) payload in place of the safetensors blob
    pickled = [_value(header, buf.getvalue()), _value(header, pickle.dumps(model.state_dict()))]

    def trap(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("pickle used while decoding a model update")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, trap)
    monkeypatch.setattr(torch, "load", trap)
    for value in pickled:
        assert _reason(value, _resigned(value)) == RejectReason.MALFORMED
    assert decode(verify(rec.value, rec.headers, KEY)).version == rec.version  # the real path needs none


@pytest.mark.parametrize("case", ["magic", "short", "header_length", "not_json", "not_object", "missing_field",
                                  "format", "validation", "bad_config", "weights_garbage", "missing_tensor",
                                  "non_finite"])
def test_malformed_signed_records(case: str) -> None:
    model = _model(7)
    rec = _record(model, seq=1)
    hlen = struct.unpack_from(">I", rec.value, 8)[0]
    header, weights = json.loads(rec.value[12:12 + hlen]), rec.value[12 + hlen:]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    value = {
        "magic": b"XXMODEL1" + rec.value[8:], "short": MAGIC + b"\x00",
        "header_length": MAGIC + struct.pack(">I", 10**6) + rec.value[12:],
        "not_json": MAGIC + struct.pack(">I", 3) + b"{x}" + weights,
        "not_object": _value([1, 2], weights),  # type: ignore[arg-type]
        "missing_field": _value({k: v for k, v in header.items() if k != "seq"}, weights),
        "format": _value(header | {"format": 99}, weights),
        "validation": _value(header | {"validation": {"mse": "low"}}, weights),
        "bad_config": _value(header | {"model": header["model"] | {"hidden_size": -3}}, weights),
        "weights_garbage": _value(header, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"),
        "missing_tensor": _value(header, mr.st_save({k: v for k, v in list(sd.items())[1:]})),
        "non_finite": _value(header, mr.st_save(sd | {next(iter(sd)): torch.full_like(next(iter(sd.values())),
                                                                                         float("nan"))})),
    }[case]
    assert _reason(value, _resigned(value)) == RejectReason.MALFORMED


def test_signing_key_must_be_long_enough() -> None:
    assert signing_key(None) is None
    assert signing_key(SecretStr("k" * 16)) == b"k" * 16
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        signing_key(SecretStr("CHANGE-ME"))


def test_header_value_reads_lists_and_mappings() -> None:
    assert header_value([("a", b"1"), ("b", "2"), ("a", b"3")], "a") == b"3"
    assert header_value({"b": "2"}, "b") == b"2" and header_value(None, "a") is None


# ------------------------------------------------------------------------------------------- the gate
def test_gate_orders_by_seq_and_checks_lineage_and_architecture() -> None:
    served = _model(8)
    gate = UpdateGate(KEY, LINEAGE)
    first = _record(_model(9), seq=2)
    assert gate.adopt(gate.screen(first.value, first.headers, served)).seq == 2 and gate.seq == 2
    for seq in (1, 2):  # an older record replayed, and the same one again
        old = _record(_model(10), seq=seq)
        with pytest.raises(UpdateRejected, match="stale"):
            gate.screen(old.value, old.headers, served)
    other = _record(_model(11), seq=3, lineage="another-model")
    with pytest.raises(UpdateRejected, match="other_lineage"):
        gate.screen(other.value, other.headers, served)
    for bigger in (_model(12, hidden=8), _model(12, channels=3), _model(12, cell="liquid")):
        rec = _record(bigger, seq=5)
        with pytest.raises(UpdateRejected) as info:
            gate.screen(rec.value, rec.headers, served)
        assert info.value.reason == RejectReason.INCOMPATIBLE
    assert gate.seq == 2


# ------------------------------------------------------------------------------------------- the follower
class UpdatesConsumer:
    """A group-less consumer of the updates topic: ``push`` records, each ``consume`` returns what was pushed."""

    def __init__(self) -> None:
        self.queue: list[Message] = []
        self.assigned: list[Any] = []
        self.offset, self.closed = 0, False

    def push(self, rec: UpdateRecord, headers: list[tuple[str, bytes]] | None = None) -> None:
        self.queue.append(Message(topic="model-updates", partition=0, offset=self.offset, key=rec.key,
                                  value=rec.value, headers=rec.headers if headers is None else headers))
        self.offset += 1

    def list_topics(self, topic: str, timeout: float = -1) -> Any:
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions={0: None})})

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = partitions

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        out, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return out

    def get_watermark_offsets(self, tp: Any, timeout: float = -1) -> tuple[int, int]:
        return 0, self.offset

    def close(self) -> None:
        self.closed = True


def _follower(key: bytes | None = KEY) -> tuple[ModelFollower, UpdatesConsumer, Metrics]:
    consumer, metrics = UpdatesConsumer(), Metrics()
    secret = SecretStr(key.decode()) if key is not None else None
    follower = ModelFollower(Settings(model_signing_key=secret), metrics,  # type: ignore[arg-type]
                             consumer=consumer, ensure_topic=lambda: None)  # type: ignore[arg-type]
    follower.start()
    return follower, consumer, metrics


def test_follower_adopts_the_newest_valid_update_and_counts_every_rejection() -> None:
    served = _model(13)
    follower, consumer, metrics = _follower()
    assert consumer.assigned[0].offset == -2  # OFFSET_BEGINNING: a restarted worker finds the latest update
    assert follower.poll(served) is None
    v1, v2 = _record(_model(14), seq=1), _record(_model(15), seq=2)
    consumer.push(v1)
    consumer.push(v2)
    consumer.queue.append(Message(error=KafkaError(KafkaError._PARTITION_EOF), topic="model-updates", partition=0))
    update = follower.poll(served)
    assert update is not None and (update.seq, update.version) == (2, v2.version)
    consumer.push(_record(_model(16), seq=9, key=OTHER_KEY))  # forged
    consumer.push(v1)  # replayed older record
    consumer.push(_record(_model(17), seq=10, key=None))  # unsigned
    assert follower.poll(served) is None
    stats = follower.stats()
    assert stats == {"adopted": 1, "rejected": 3, "superseded": 1, "seq": 2,
                     "rejected_by_reason": {"bad_signature": 1, "stale": 1, "unsigned": 1}}
    assert metrics.value("liquidstream_model_updates_total", result="adopted", reason="ok") == 1.0
    for reason in ("bad_signature", "stale", "unsigned"):
        assert metrics.value("liquidstream_model_updates_total", result="rejected", reason=reason) == 1.0


class _UnreadableHeaders:
    """A record whose header name is not UTF-8: confluent-kafka's ``headers()`` raises ``SystemError``."""

    def __init__(self, rec: UpdateRecord, offset: int) -> None:
        self.rec, self._offset = rec, offset

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self.rec.value

    def key(self) -> bytes:
        return self.rec.key

    def topic(self) -> str:
        return "model-updates"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def headers(self) -> list[tuple[str, bytes]]:
        try:
            b"\xff".decode("utf-8")
        except UnicodeDecodeError as ex:
            raise SystemError("<built-in method headers> returned a result with an exception set") from ex
        return []


def test_a_record_with_unreadable_headers_is_rejected_as_malformed_not_a_crash() -> None:
    served = _model(13)
    follower, consumer, metrics = _follower()
    consumer.queue.append(_UnreadableHeaders(_record(_model(14), seq=5), offset=0))  # type: ignore[arg-type]
    consumer.offset = 1
    assert follower.poll(served) is None  # rejected, the worker goes on
    assert follower.stats()["rejected_by_reason"] == {"malformed": 1}
    assert metrics.value("liquidstream_model_updates_total", result="rejected", reason="malformed") == 1.0
    v = _record(_model(15), seq=6)
    consumer.push(v)
    update = follower.poll(served)
    assert update is not None and update.version == v.version  # later valid records are still adopted


def test_trainer_start_takes_the_newest_usable_update_and_numbers_on_from_the_newest_verified() -> None:
    base = _model(21)
    consumer = UpdatesConsumer()
    usable = _record(_model(22), seq=2)
    for rec in (_record(_model(23), seq=1), usable, _record(_model(24, hidden=8), seq=3),
                _record(_model(25), seq=9, key=OTHER_KEY), _record(_model(26), seq=10, key=None)):
        consumer.push(rec)
    latest, top_seq = read_latest(consumer, "model-updates", UpdateGate(KEY, LINEAGE), base)  # type: ignore[arg-type]
    assert latest is not None and (latest.seq, latest.version) == (2, usable.version)
    assert top_seq == 3  # seq 3 verified (another architecture: not usable); forged and unsigned ones count for nothing
    empty = UpdatesConsumer()
    assert read_latest(empty, "model-updates", UpdateGate(KEY, LINEAGE), base) == (None, 0)  # type: ignore[arg-type]


def test_follower_without_a_key_adopts_nothing() -> None:
    follower, consumer, metrics = _follower(key=None)
    consumer.push(_record(_model(18), seq=1))
    assert follower.poll(_model(13)) is None
    assert follower.stats()["rejected_by_reason"] == {"no_key": 1}
    assert metrics.value("liquidstream_model_updates_total", result="rejected", reason="no_key") == 1.0


def test_settings_follow_updates_when_a_key_is_set() -> None:
    assert not Settings().follows_model_updates
    assert Settings(model_signing_key="k" * 16).follows_model_updates  # type: ignore[arg-type]
    assert not Settings(model_signing_key="k" * 16,  # type: ignore[arg-type]
                        follow_model_updates=False).follows_model_updates
    assert Settings(follow_model_updates=True).follows_model_updates  # and then rejects all: no_key


# ------------------------------------------------------------------------------------------- the worker
def test_worker_swaps_models_only_between_batches(capsys: pytest.CaptureFixture[str]) -> None:
    """Batch 1 is served by the starting model; an update arriving meanwhile is adopted before batch 2."""
    served = _model(19)
    new = _model(20)
    rec = _record(new, seq=1)
    follower, updates, _ = _follower()
    log: list[str] = []
    b1, b2 = _now_batch(0, 0, 3, "a"), _now_batch(0, 3, 3, "a")

    def on_call(n: int) -> None:
        if n == 1:  # while batch 1 is being fetched (after the loop's poll), the update lands on the topic
            updates.push(rec)

    consumer = FakeConsumer(log, [b1, b2], on_call)
    settings = Settings(exit_when_idle_s=0.0, predictions_topic="preds", dlq_topic="dlq", ts_min_ms=0,
                        guarantee="exactly_once", metrics_port=0)
    producer = FakeProducer(log)
    worker = _Worker(settings, LiquidOperator(served, OperatorSettings(), model_version="v0"), worker_id="w",
                     consumer=consumer, producer=producer, updates=follower)  # type: ignore[arg-type]
    assert worker.run() == 0
    versions = [json.loads(v)["model_version"] for t, _, v, _ in producer.committed if t == "preds" and v]
    assert versions == ["v0"] * 3 + [rec.version] * 3
    assert worker.operator.model_version == rec.version
    assert worker.ops.metrics.value("liquidstream_model_version", version=rec.version) == 1.0
    assert worker.ops.metrics.value("liquidstream_model_version", version="v0") is None  # one series at a time
    for name, tensor in new.state_dict().items():
        assert torch.equal(worker.operator.model.state_dict()[name], tensor)
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["model_version"] == rec.version and final["model_updates"]["adopted"] == 1
    assert updates.closed
