"""Tests of the dead-letter records (liquidstream.pipeline.wire.dead_letters)."""

from __future__ import annotations

import time

import pytest

from liquidstream.pipeline.errors import EncodeError
from liquidstream.pipeline.wire.codec import DecodeLimits, Reject, decode_batch
from liquidstream.pipeline.wire.contract import SCHEMA_VERSION
from liquidstream.pipeline.wire.dead_letters import (
    HEADER_CLASS,
    HEADER_FAILED_AT,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    HEADER_WORKER,
    MAX_DEAD_LETTER_BYTES,
    MAX_DETAIL_BYTES,
    DeadLetter,
    dead_letter_budget,
    dead_letter_headers,
    parse_dead_letter_headers,
)
from liquidstream.pipeline.wire.schemas import DeadLetterReason

R = DeadLetterReason


def test_header_names_order_and_values() -> None:
    headers = dead_letter_headers(R.WRONG_LENGTH, "values has 2 entries, expected 3", "readings", 4, 1234,
                                  worker_id="worker-a", failed_at_ms=1_700_000_000_123)
    assert headers == [
        ("ls.error.class", b"wrong_length"),
        ("ls.error.reason", b"values has 2 entries, expected 3"),
        ("ls.source.topic", b"readings"),
        ("ls.source.partition", b"4"),
        ("ls.source.offset", b"1234"),
        ("ls.failed.at", b"1700000000123"),
        ("ls.worker", b"worker-a"),
        ("ls.schema", b"dead-letter"),
        ("ls.schema.version", str(SCHEMA_VERSION).encode()),
    ]
    assert all(isinstance(name, str) and isinstance(value, bytes) for name, value in headers)


def test_worker_is_optional_and_failed_at_is_the_wall_clock() -> None:
    before = time.time_ns() // 1_000_000
    parsed = parse_dead_letter_headers(dead_letter_headers("late", "older than last event", "t", 0, 0))
    after = time.time_ns() // 1_000_000
    assert HEADER_WORKER not in parsed
    assert before <= int(parsed[HEADER_FAILED_AT]) <= after
    assert parsed[HEADER_CLASS] == "late"


@pytest.mark.parametrize("reason", list(DeadLetterReason))
def test_parse_is_the_inverse(reason: DeadLetterReason) -> None:
    headers = dead_letter_headers(reason, "détail ü", "in-topic", 2, 2**40, worker_id="w", failed_at_ms=5)
    assert parse_dead_letter_headers(headers) == {
        HEADER_CLASS: reason.value, HEADER_REASON: "détail ü", HEADER_TOPIC: "in-topic",
        HEADER_PARTITION: "2", HEADER_OFFSET: str(2**40), HEADER_FAILED_AT: "5", HEADER_WORKER: "w",
        "ls.schema": "dead-letter", "ls.schema.version": str(SCHEMA_VERSION),
    }


def test_unknown_reason_is_refused() -> None:
    with pytest.raises(EncodeError, match="unknown dead-letter reason 'bogus'"):
        dead_letter_headers("bogus", "x", "t", 0, 0)


def test_long_and_unencodable_details_stay_valid_small_headers() -> None:
    long = dead_letter_headers(R.SCHEMA, "é" * 5000, "t", 0, 0)[1][1]
    assert len(long) <= MAX_DETAIL_BYTES and long.endswith(b"...")
    long.decode("utf-8")  # never cut inside a multi-byte character
    surrogate = dead_letter_headers(R.SCHEMA, "device_id 'a\ud800'", "t", 0, 0)[1][1]
    assert surrogate == b"device_id 'a\\ud800'"


def test_parse_skips_foreign_headers_and_tolerates_none_and_str() -> None:
    assert parse_dead_letter_headers(None) == {}
    headers = [("traceparent", b"00-abc"), ("ls.error.class", b"schema"), ("ls.worker", None),
               ("ls.error.reason", "text"), ("ls.error.class", b"empty"), ("ls.source.topic", b"\xff")]
    assert parse_dead_letter_headers(headers) == {
        "ls.error.class": "empty", "ls.worker": "", "ls.error.reason": "text", "ls.source.topic": "\ufffd"}


def test_dead_letter_keeps_original_key_and_value_bytes() -> None:
    limits = DecodeLimits(n_channels=2, max_payload_bytes=1024, ts_min_ms=0, max_future_ms=0)
    raw = b'{"device_id": "pump-7", "ts": 5, "values": [1, NaN]}'
    batch = decode_batch([raw], [b"pump-7"], limits, now_ms=10)
    (reject,) = batch.rejects
    dl = DeadLetter.from_reject(reject, key=b"pump-7", value=raw, topic="readings", partition=1, offset=77,
                                worker_id="w-1", failed_at_ms=99)
    assert dl.key == b"pump-7" and dl.value is raw
    assert dl.reason is R.NON_FINITE
    parsed = parse_dead_letter_headers(dl.headers)
    assert parsed[HEADER_REASON] == "values[1] is NaN"
    assert (parsed[HEADER_TOPIC], parsed[HEADER_PARTITION], parsed[HEADER_OFFSET]) == ("readings", "1", "77")
    assert dl.produce_kwargs() == {"key": b"pump-7", "value": raw, "headers": dl.headers}


def test_null_value_and_key_stay_null() -> None:
    dl = DeadLetter.from_reject(Reject(3, R.EMPTY, "payload is null"), key=None, value=None, topic="t",
                                partition=0, offset=3)
    assert dl.key is None and dl.value is None
    assert dl.reason is R.EMPTY


def test_original_headers_are_forwarded_without_stale_ls_headers() -> None:
    original = [("traceparent", b"00-abc"), ("ls.error.class", b"schema"), ("content-type", None)]
    dl = DeadLetter.build(R.DUPLICATE, "same device and ts", key=b"k", value=b"v", topic="t", partition=0,
                          offset=1, failed_at_ms=0, original_headers=original)
    assert dl.headers[:2] == [("traceparent", b"00-abc"), ("content-type", None)]
    assert [name for name, _ in dl.headers].count(HEADER_CLASS) == 1
    assert dl.reason is R.DUPLICATE


def _size(dl: DeadLetter) -> int:
    return len(dl.key or b"") + len(dl.value or b"") + sum(len(n) + len(v or b"") for n, v in dl.headers)


def test_oversized_dead_letters_are_cut_to_fit_and_say_what_was_cut() -> None:
    import hashlib
    import json

    big_key, big_value = b"k" * 1_200_000, b"v" * 2_500_000
    junk = [(f"h{i}", b"x" * 50) for i in range(20_000)]  # ~1 MB of forwarded headers
    for key, value, headers in ((big_key, b"{}", []), (b"pump-1", big_value, [("trace", b"t")]),
                                (b"pump-1", b"{}", junk), (big_key, big_value, junk)):
        dl = DeadLetter.build(DeadLetterReason.MALFORMED_JSON, "too big", key=key, value=value, topic="t",
                              partition=0, offset=7, original_headers=headers)
        truncated = dict(dl.headers)["ls.truncated"]
        assert _size(dl) <= MAX_DEAD_LETTER_BYTES + len(truncated) + len("ls.truncated")  # < message.max.bytes
        cut = json.loads(truncated)
        assert (dl.key or b"") == key[: len(dl.key or b"")] and (dl.value or b"") == value[: len(dl.value or b"")]
        if "value_bytes" in cut:
            assert (cut["value_bytes"], cut["value_kept"]) == (len(value), len(dl.value or b""))
            assert cut["value_sha256"] == hashlib.sha256(value).hexdigest()
        if "key_bytes" in cut:
            assert (cut["key_bytes"], cut["key_sha256"]) == (len(key), hashlib.sha256(key).hexdigest())
        assert parse_dead_letter_headers(dl.headers)["ls.source.offset"] == "7"
    small = DeadLetter.build(DeadLetterReason.MALFORMED_JSON, "x", key=b"k", value=b"v" * 1000, topic="t",
                             partition=0, offset=1)
    assert "ls.truncated" not in dict(small.headers) and small.value == b"v" * 1000


def test_unreadable_original_headers_become_a_header_not_a_crash() -> None:
    def headers() -> list[tuple[str, bytes]]:
        raise SystemError("headers() returned a result with an exception set")

    dl = DeadLetter.build(DeadLetterReason.MALFORMED_JSON, "x", key=b"k", value=b"v", topic="t", partition=0,
                          offset=1, original_headers=headers)
    names = [n for n, _ in dl.headers]
    assert "ls.headers.unreadable" in names and all(n.startswith("ls.") for n in names)
    assert dl.key == b"k" and dl.value == b"v"


def test_the_budget_follows_the_producers_message_max_bytes() -> None:
    from liquidstream.pipeline.errors import ConfigurationError
    from liquidstream.pipeline.kafka.output import OutputTopics
    from liquidstream.pipeline.settings import Settings

    assert dead_letter_budget({}) == MAX_DEAD_LETTER_BYTES
    assert dead_letter_budget({"message.max.bytes": "100000"}) == 90_000
    for bad in ("lots", "1000"):
        with pytest.raises(ConfigurationError, match="message.max.bytes"):
            dead_letter_budget({"message.max.bytes": bad})
    topics = OutputTopics.from_settings(Settings(kafka_config={"message.max.bytes": "100000"}))
    assert (topics.dlq, topics.dlq_max_bytes) == (Settings().dlq_topic, 90_000)
    dl = DeadLetter.build(DeadLetterReason.MALFORMED_JSON, "x", key=b"k", value=b"v" * 95_000, topic="t",
                          partition=0, offset=1, max_bytes=topics.dlq_max_bytes)
    assert len(dl.value or b"") < 90_000 and "ls.truncated" in dict(dl.headers)
