"""Smoke tests for the integration broker: keyed produce/consume and transactions (read_committed).

They prove the broker configuration the rest of the suite relies on, notably that a single broker can
host the transaction-state topic (replication factor 1), which exactly-once processing needs later.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from typing import TYPE_CHECKING

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

if TYPE_CHECKING:  # conftest is not an importable module at run time; the Protocol is for type checkers
    from tests.conftest import MakeTopic

pytestmark = pytest.mark.integration

MESSAGE_COUNT = 1_000
KEY_COUNT = 37  # prime, so keys spread over all partitions rather than aliasing with the count of 4
CONSUME_DEADLINE_S = 60.0  # seconds; a healthy local broker needs well under 5
TXN_TIMEOUT_S = 30.0  # seconds, for init/commit/abort_transaction


def _partition(message: Message) -> int:
    partition = message.partition()
    assert partition is not None, "data messages always carry a partition"
    return partition


def _offset(message: Message) -> int:
    offset = message.offset()
    assert offset is not None, "consumed data messages always carry an offset"
    return offset


def _text(payload: bytes | None) -> str:
    assert payload is not None, "every message in these tests has a key and a value"
    return payload.decode()


def _consumer(bootstrap: str, **overrides: str | bool | int) -> Consumer:
    config: dict[str, str | bool | int] = {
        "bootstrap.servers": bootstrap,
        "group.id": f"smoke-{uuid.uuid4().hex[:12]}",  # fresh group: no committed offsets
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    }
    config.update(overrides)
    return Consumer(config)


def _drain(consumer: Consumer, topic: str, partitions: int) -> list[Message]:
    """Read `topic` from the start until every partition reports EOF; return the data messages.

    Nothing is produced concurrently, so end-of-partition on all partitions means everything visible
    under the consumer's isolation level has been read.
    """
    consumer.subscribe([topic])
    received: list[Message] = []
    at_eof: set[int] = set()
    deadline = time.monotonic() + CONSUME_DEADLINE_S
    while len(at_eof) < partitions:
        if time.monotonic() > deadline:
            pytest.fail(
                f"only {len(received)} messages and EOF on {sorted(at_eof)} after {CONSUME_DEADLINE_S} s"
            )
        for message in consumer.consume(num_messages=500, timeout=0.5):
            error = message.error()
            if error is None:
                received.append(message)
                at_eof.discard(_partition(message))  # more data arrived after an EOF: not done yet
            elif error.code() == KafkaError._PARTITION_EOF:
                at_eof.add(_partition(message))
            else:
                raise KafkaException(error)
    return received


def test_keyed_messages_round_trip_in_partition_order(kafka_bootstrap: str, make_topic: MakeTopic) -> None:
    topic = make_topic(4)
    # Idempotence keeps per-partition order even if the client retries a batch.
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    delivered: dict[int, list[int]] = defaultdict(list)  # partition -> sequence numbers, in offset order
    failures: list[str] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            delivered[_partition(message)].append(int(_text(message.value())))

    for sequence in range(MESSAGE_COUNT):
        producer.produce(
            topic, key=f"device-{sequence % KEY_COUNT}", value=str(sequence), on_delivery=on_delivery
        )
        producer.poll(0)  # serve delivery callbacks as we go
    assert producer.flush(30) == 0, "messages still queued after 30 s"
    assert failures == []

    consumer = _consumer(kafka_bootstrap)
    try:
        received = _drain(consumer, topic, partitions=4)
    finally:
        consumer.close()

    assert len(received) == MESSAGE_COUNT
    sequences = sorted(int(_text(m.value())) for m in received)
    assert sequences == list(range(MESSAGE_COUNT)), "lost or duplicated messages"

    by_partition: dict[int, list[Message]] = defaultdict(list)
    partition_of_key: dict[str, int] = {}
    for message in received:
        partition = _partition(message)
        by_partition[partition].append(message)
        # Keyed partitioning: every key stays on one partition (what per-device state relies on).
        assert partition_of_key.setdefault(_text(message.key()), partition) == partition
    assert sorted(by_partition) == [0, 1, 2, 3], "37 keys should cover all 4 partitions"
    for partition, messages in by_partition.items():
        offsets = [_offset(m) for m in messages]
        assert offsets == sorted(offsets), f"partition {partition} consumed out of offset order"
        values = [int(_text(m.value())) for m in messages]
        assert values == sorted(values), f"partition {partition} not in production order"
        assert values == delivered[partition], f"partition {partition} differs from what was delivered"


def test_read_committed_sees_only_committed_transactions(kafka_bootstrap: str, make_topic: MakeTopic) -> None:
    partitions = 3
    topic = make_topic(partitions)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"smoke-txn-{uuid.uuid4().hex[:12]}"}
    )
    producer.init_transactions(TXN_TIMEOUT_S)

    def send_in_transaction(label: str, count: int, *, commit: bool) -> list[str]:
        values = [f"{label}-{i}" for i in range(count)]
        producer.begin_transaction()
        for i, value in enumerate(values):
            producer.produce(topic, key=f"k{i}", value=value)
        # Make sure the records reach the log before the outcome marker, so the aborted ones really
        # are on the broker and read_committed has something to filter out.
        assert producer.flush(TXN_TIMEOUT_S) == 0
        if commit:
            producer.commit_transaction(TXN_TIMEOUT_S)
        else:
            producer.abort_transaction(TXN_TIMEOUT_S)
        return values

    committed = send_in_transaction("first", 5, commit=True)
    aborted = send_in_transaction("aborted", 7, commit=False)
    committed += send_in_transaction("second", 4, commit=True)

    committed_reader = _consumer(kafka_bootstrap, **{"isolation.level": "read_committed"})
    try:
        seen_committed = [_text(m.value()) for m in _drain(committed_reader, topic, partitions)]
    finally:
        committed_reader.close()
    assert sorted(seen_committed) == sorted(committed)

    # Control: the aborted records were written; only the isolation level hides them.
    uncommitted_reader = _consumer(kafka_bootstrap, **{"isolation.level": "read_uncommitted"})
    try:
        seen_all = [_text(m.value()) for m in _drain(uncommitted_reader, topic, partitions)]
    finally:
        uncommitted_reader.close()
    assert sorted(seen_all) == sorted(committed + aborted)
