"""Tests of the batch codec (liquidstream.pipeline.wire.codec), including a hypothesis cross-check against
``Reading``."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from liquidstream.pipeline.errors import ConfigurationError, DecodeError, EncodeError
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.codec import DecodedBatch, DecodeLimits, Reject, decode_batch, encode_json
from liquidstream.pipeline.wire.contract import Source
from liquidstream.pipeline.wire.schemas import FLOAT32_OVERFLOW, DeadLetterReason, Reading, reason_for

R = DeadLetterReason
NOW = 1_700_000_000_000  # epoch ms
LIMITS = DecodeLimits(n_channels=3, max_payload_bytes=600, ts_min_ms=946_684_800_000, max_future_ms=60_000)


def _msg(**overrides: Any) -> bytes:
    obj: dict[str, Any] = {"device_id": "pump-7", "ts": NOW, "values": [1.0, 2.0, 3.0]}
    obj.update(overrides)
    return json.dumps(obj).encode()


def _decode(payloads: list[bytes | None], keys: list[bytes | None] | None = None,
            limits: DecodeLimits = LIMITS) -> DecodedBatch:
    batch = decode_batch(payloads, keys, limits, NOW)
    assert len(batch) + len(batch.rejects) == len(payloads)
    assert sorted([*batch.index.tolist(), *(r.index for r in batch.rejects)]) == list(range(len(payloads)))
    return batch


def _only_reject(payload: bytes | None, key: bytes | None = None) -> Reject:
    batch = _decode([payload], [key])
    assert len(batch) == 0, batch.device_ids
    (reject,) = batch.rejects
    return reject


# --- one example per reason ---------------------------------------------------------------------------

WITHOUT_DEVICE = b'{"ts": %d, "values": [1, 2, 3]}' % NOW
EXAMPLES: list[tuple[bytes | None, bytes | None, DeadLetterReason, str]] = [
    (None, None, R.EMPTY, "payload is null"),
    (b"", None, R.EMPTY, "payload is empty"),
    (b" " * 601, None, R.OVERSIZE, "601 bytes, limit 600"),
    (b'{"device_id": "\xff"}', None, R.UNDECODABLE, "not UTF-8"),
    (b'{"device_id": ', None, R.MALFORMED_JSON, "invalid JSON"),
    (b"\xef\xbb\xbf" + _msg(), None, R.MALFORMED_JSON, "BOM"),
    (b"[1, 2, 3]", None, R.SCHEMA, "payload must be a JSON object, got array"),
    (b"3", None, R.SCHEMA, "got integer"),
    (b'"x"', None, R.SCHEMA, "got string"),
    (b"null", None, R.SCHEMA, "got null"),
    (WITHOUT_DEVICE, None, R.SCHEMA, "device_id is missing"),
    (_msg(device_id=""), None, R.SCHEMA, "device_id is empty"),
    (_msg(device_id="  "), None, R.SCHEMA, "device_id is blank"),
    (_msg(device_id="x" * 257), None, R.SCHEMA, "longer than 256"),
    (_msg(device_id=12), None, R.SCHEMA, "device_id must be a string, got integer"),
    (_msg(device_id="a\ud800"), None, R.SCHEMA, "lone surrogate"),
    (_msg(ts=1.5), None, R.SCHEMA, "ts must be an integer (epoch ms), got number"),
    (_msg(ts=float(NOW)), None, R.SCHEMA, "got number"),
    (_msg(ts=True), None, R.SCHEMA, "got boolean"),
    (_msg(ts=str(NOW)), None, R.SCHEMA, "got string"),
    (_msg(values=None), None, R.SCHEMA, "values must be an array, got null"),
    (_msg(values=[]), None, R.SCHEMA, "values is empty"),
    (_msg(values=[1.0, True, 3.0]), None, R.SCHEMA, "values[1] must be a number, got boolean"),
    (_msg(values=[1.0, 2.0, "3"]), None, R.SCHEMA, "values[2] must be a number, got string"),
    (_msg(channels="abc"), None, R.SCHEMA, "channels must be an array"),
    (_msg(channels=["a", 2, "c"]), None, R.SCHEMA, "channels[1] must be a string, got integer"),
    (_msg(values=[1.0, math.nan, 3.0]), None, R.NON_FINITE, "values[1] is NaN"),
    (_msg(values=[math.inf, 1.0, 3.0]), None, R.NON_FINITE, "values[0] is Infinity"),
    (_msg(values=[1.0, 2.0, -math.inf]), None, R.NON_FINITE, "values[2] is -Infinity"),
    (_msg(values=[1.0, 1e300, 3.0]), None, R.NON_FINITE, "values[1] = 1e+300 overflows float32"),
    (_msg(values=[1.0, 2.0, 10**400]), None, R.NON_FINITE, "values[2] is an integer too large for float32"),
    (b'{"device_id": "d", "ts": %d, "values": [1, 1e400, 3]}' % NOW, None, R.NON_FINITE,
     "values[1] is Infinity"),
    (_msg(values=[1.0, 2.0]), None, R.WRONG_LENGTH, "values has 2 entries, expected 3"),
    (_msg(values=[1.0, 2.0, 3.0, 4.0]), None, R.WRONG_LENGTH, "values has 4 entries, expected 3"),
    (_msg(channels=["a", "b"]), None, R.WRONG_LENGTH, "channels has 2 names for 3 values"),
    (_msg(ts=LIMITS.ts_min_ms - 1), None, R.BAD_TIMESTAMP, "before ts_min_ms"),
    (_msg(ts=NOW + 60_001), None, R.BAD_TIMESTAMP, "more than 60000 ms ahead of now"),
    (_msg(ts=10**30), None, R.BAD_TIMESTAMP, "ahead of now"),
    (_msg(ts=-(10**30)), None, R.BAD_TIMESTAMP, "before ts_min_ms"),
    (_msg(), b"pump-8", R.KEY_MISMATCH, "message key 'pump-8' != device_id 'pump-7'"),
    (_msg(), b"", R.KEY_MISMATCH, "message key ''"),
    (_msg(), b"\xff", R.KEY_MISMATCH, "'\\\\xff'"),
]


@pytest.mark.parametrize(("payload", "key", "reason", "detail"), EXAMPLES)
def test_each_reason(payload: bytes | None, key: bytes | None, reason: DeadLetterReason, detail: str) -> None:
    reject = _only_reject(payload, key)
    assert reject.reason is reason
    assert detail in reject.detail
    assert reject.index == 0


def test_deep_nesting_is_malformed_json_not_a_crash() -> None:
    limits = DecodeLimits(n_channels=3, max_payload_bytes=10**6, ts_min_ms=0, max_future_ms=0)
    batch = _decode([b"[" * 200_000 + b"]" * 200_000], limits=limits)
    assert batch.rejects[0].reason is R.MALFORMED_JSON


def test_integer_beyond_python_digit_limit_is_malformed_json() -> None:
    limits = DecodeLimits(n_channels=3, max_payload_bytes=10**6, ts_min_ms=0, max_future_ms=0)
    batch = _decode([b'{"device_id": "d", "ts": ' + b"1" * 5000 + b', "values": [1, 2, 3]}'], limits=limits)
    assert batch.rejects[0].reason is R.MALFORMED_JSON


@pytest.mark.parametrize(("payload", "reason"), [
    (_msg(values=[math.nan, 2.0]), R.NON_FINITE),  # non_finite before wrong_length
    (_msg(values=[math.nan, 2.0, 3.0], channels=["a"]), R.NON_FINITE),
    (_msg(values=[math.nan, 2.0, 3.0], ts=0), R.NON_FINITE),  # ... before bad_timestamp
    (_msg(values=[1.0, 2.0], ts=0), R.WRONG_LENGTH),  # wrong_length before bad_timestamp
    (_msg(ts=1.5, values=[math.nan]), R.SCHEMA),  # schema before everything after it
    (b" " * 590 + b"\xff" * 20, R.OVERSIZE),  # size is checked before decoding
])
def test_precedence(payload: bytes, reason: DeadLetterReason) -> None:
    assert _only_reject(payload, b"other-device").reason is reason


def test_valid_batch_columns() -> None:
    payloads: list[bytes | None] = [
        _msg(device_id="a", values=[1, 2, 3]),
        _msg(device_id="b", ts=NOW - 5, values=[0.1, -2.5, 3e38], channels=["x", "y", "z"], extra=[1]),
        None,
        _msg(device_id="é-ü", values=[1.0, math.nan, 3.0]),
        _msg(device_id="é-ü", values=[7.0, 8.0, 9.0]),
    ]
    batch = _decode(payloads, [b"a", None, None, None, "é-ü".encode()])
    assert batch.index.dtype == np.int64 and batch.index.tolist() == [0, 1, 4]
    assert batch.device_ids == ["a", "b", "é-ü"]
    assert batch.ts_ms.dtype == np.int64 and batch.ts_ms.tolist() == [NOW, NOW - 5, NOW]
    assert batch.values.dtype == np.float32 and batch.values.shape == (3, 3)
    assert batch.values.flags.c_contiguous
    np.testing.assert_array_equal(batch.values[1], np.array([0.1, -2.5, 3e38], dtype=np.float32))
    assert batch.channels == [None, ["x", "y", "z"], None]
    assert [(r.index, r.reason) for r in batch.rejects] == [(2, R.EMPTY), (3, R.NON_FINITE)]


@pytest.mark.parametrize("payloads", [[], [None, b"", b"[]"]])
def test_empty_and_all_invalid_batches_have_well_formed_columns(payloads: list[bytes | None]) -> None:
    batch = _decode(payloads, None)
    assert batch.values.shape == (0, 3) and batch.values.dtype == np.float32
    assert batch.index.shape == (0,) and batch.ts_ms.shape == (0,) and batch.ts_ms.dtype == np.int64


def test_float32_boundary_matches_the_schema() -> None:
    largest_ok = float(np.nextafter(FLOAT32_OVERFLOW, 0.0))
    batch = _decode([_msg(values=[largest_ok, -largest_ok, 2**127]), _msg(values=[FLOAT32_OVERFLOW, 0, 0]),
                     _msg(values=[2**128 - 2**103 - 1, 0, 0])])
    assert batch.index.tolist() == [0]
    assert np.isfinite(batch.values).all()
    assert [r.reason for r in batch.rejects] == [R.NON_FINITE, R.NON_FINITE]


def test_timestamp_window_is_inclusive() -> None:
    batch = _decode([_msg(ts=LIMITS.ts_min_ms), _msg(ts=NOW + LIMITS.max_future_ms)])
    assert len(batch) == 2


def test_keys_must_match_payloads_in_length() -> None:
    with pytest.raises(DecodeError, match="keys has 1 entries but payloads has 2"):
        decode_batch([_msg(), _msg()], [None], LIMITS, NOW)


def test_limits_validation_and_from_settings() -> None:
    with pytest.raises(ConfigurationError):
        DecodeLimits(n_channels=0, max_payload_bytes=100, ts_min_ms=0, max_future_ms=0)
    with pytest.raises(ConfigurationError):
        DecodeLimits(n_channels=1, max_payload_bytes=100, ts_min_ms=0, max_future_ms=-1)
    s = Settings(max_payload_bytes=4096, ts_min_ms=123, max_future_s=1.5)
    assert DecodeLimits.from_settings(s, 8) == DecodeLimits(8, 4096, 123, 1500, require_key=True)
    assert not DecodeLimits.from_settings(Settings(require_key=False), 8).require_key


def test_a_keyless_message_is_a_key_mismatch_where_keys_are_required() -> None:
    strict = dataclasses.replace(LIMITS, require_key=True)
    plain, named = _msg(device_id="pump-1"), _msg(device_id="pump-1", channels=["x", "y", "z"])
    for payload in (plain, named):  # the fast path and parse_reading alike
        batch = decode_batch([payload, payload], [None, b"pump-1"], strict, NOW)
        assert [r.index for r in batch.rejects] == [0] and batch.device_ids == ["pump-1"]
        assert batch.rejects[0].reason == DeadLetterReason.KEY_MISMATCH
        assert "no key" in batch.rejects[0].detail and "pump-1" in batch.rejects[0].detail
        assert len(decode_batch([payload], [None], LIMITS, NOW).device_ids) == 1  # not required: accepted
        assert len(decode_batch([payload], None, strict, NOW).device_ids) == 1  # no keys at all (a file)


def test_encode_json() -> None:
    assert encode_json({"a": [1, 2.5], "b": None}) == b'{"a":[1,2.5],"b":null}'
    assert encode_json({"d": "é"}) == '{"d":"é"}'.encode()
    assert encode_json(np.arange(3, dtype=np.int64)) == b"[0,1,2]"
    assert json.loads(encode_json(Source(topic="t", partition=1, offset=2))) == {
        "topic": "t", "partition": 1, "offset": 2}
    for bad in ({"x": math.nan}, {"x": np.float32("inf")}, {"x": object()}, {"x": "\ud800"}):
        with pytest.raises(EncodeError):
            encode_json(bad)


# --- hypothesis cross-check against the Reading model --------------------------------------------------

def _reference(payload: bytes | None, key: bytes | None) -> tuple[DeadLetterReason | None, Reading | None]:
    """What the contract says, built from ``Reading`` and the limits, one message at a time."""
    if not payload:
        return R.EMPTY, None
    if len(payload) > LIMITS.max_payload_bytes:
        return R.OVERSIZE, None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return R.UNDECODABLE, None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return R.MALFORMED_JSON, None
    try:
        reading = Reading.model_validate(obj)
    except ValidationError as ex:
        return reason_for(ex), None
    if len(reading.values) != LIMITS.n_channels:
        return R.WRONG_LENGTH, None
    if not LIMITS.ts_min_ms <= reading.ts <= NOW + LIMITS.max_future_ms:
        return R.BAD_TIMESTAMP, None
    if key is not None and key != reading.device_id.encode():
        return R.KEY_MISMATCH, None
    return None, reading


NASTY_NUMBERS = [math.nan, math.inf, -math.inf, 1e300, -1e39, 10**400, 2**64, -(2**63), 0, -0.0, 5e-324,
                 FLOAT32_OVERFLOW, float(np.nextafter(FLOAT32_OVERFLOW, 0.0)), 2**128 - 2**103 - 1]
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
numbers = st.one_of(finite32, finite32, finite32, st.integers(-(10**6), 10**6), st.floats(),
                    st.sampled_from(NASTY_NUMBERS))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
SPECIAL_IDS = ["", " ", "\t\u3000", "x" * 256, "é" * 256, "x" * 257, "a\ud800", "dev-1"]
ordinary_ids = st.text(min_size=1, max_size=10)
device_ids = st.one_of(ordinary_ids, ordinary_ids, ordinary_ids, st.sampled_from(SPECIAL_IDS))
in_window = st.integers(NOW - 10**9, NOW + LIMITS.max_future_ms)
timestamps = st.one_of(in_window, in_window, in_window,
                       st.integers(LIMITS.ts_min_ms - 10, LIMITS.ts_min_ms + 10),
                       st.integers(NOW + LIMITS.max_future_ms - 10, NOW + LIMITS.max_future_ms + 10),
                       st.sampled_from([10**30, -(10**30), 0, -1, 2**63, 2**63 - 1]))
readings = st.fixed_dictionaries(
    {"device_id": device_ids, "ts": timestamps, "values": st.lists(numbers, min_size=3, max_size=3)},
    optional={"channels": st.none() | st.lists(st.text(max_size=4), min_size=3, max_size=3),
              "extra": junk, "firmware": st.text(max_size=5)},
)
FIELDS = ["device_id", "ts", "values", "channels"]


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    obj: dict[str, Any] = draw(readings)
    kind = draw(st.sampled_from(["none"] * 4 + ["drop", "junk", "ts", "values", "values", "channels", "top"]))
    if kind == "drop":
        obj.pop(draw(st.sampled_from(FIELDS)), None)
    elif kind == "junk":
        obj[draw(st.sampled_from(FIELDS))] = draw(junk)
    elif kind == "ts":
        ts = obj["ts"]
        obj["ts"] = draw(st.sampled_from([ts + 0.5, float(ts), True, False, str(ts), None, 1.5]))
    elif kind == "values":
        values = obj["values"]
        op = draw(st.sampled_from(["insert", "drop", "replace", "empty"]))
        position = draw(st.integers(0, len(values) - 1))
        bad = draw(st.sampled_from([math.nan, math.inf, True, "1", None, [1.0], 1e300, 10**400, 2.5]))
        if op == "insert":
            values.insert(position, bad)
        elif op == "drop":
            values.pop(position)
        elif op == "replace":
            values[position] = bad
        else:
            obj["values"] = []
    elif kind == "channels":
        obj["channels"] = draw(st.sampled_from([["a"], ["a", "b", "c", "d"], ["a", 1, "c"], "abc", [],
                                                ["a", "b", "\udc80"]]))
    elif kind == "top":
        return draw(st.one_of(junk, st.just([obj])))
    return obj


def _serialise(obj: Any, ensure_ascii: bool) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only an escaped form is valid UTF-8
        return json.dumps(obj, ensure_ascii=True).encode("utf-8")


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    sources = ["json"] * 8 + ["raw", "truncated", "padded", "bad_utf8", "empty"]
    source = draw(st.sampled_from(sources))
    obj = draw(mutated())
    text = _serialise(obj, draw(st.booleans()))
    payload: bytes | None = text
    if source == "raw":
        payload = draw(st.binary(max_size=40))
    elif source == "truncated":
        payload = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    elif source == "padded":
        payload = b" " * draw(st.integers(0, 700)) + text
    elif source == "bad_utf8":
        cut = draw(st.integers(0, len(text)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]))  # \xed\xa0\x80: surrogate
        payload = text[:cut] + bad + text[cut:]
    elif source == "empty":
        payload = draw(st.sampled_from([None, b""]))
    key_kind = draw(st.sampled_from(["none", "match", "match", "other"]))
    key: bytes | None = None
    if key_kind == "match" and isinstance(obj, dict) and isinstance(obj.get("device_id"), str):
        key = obj["device_id"].encode("utf-8", errors="surrogatepass")
    elif key_kind == "other":
        key = draw(st.binary(max_size=6))
    return payload, key


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(), min_size=1, max_size=12))
def test_codec_accepts_exactly_what_the_contract_accepts(
        batch_in: list[tuple[bytes | None, bytes | None]]) -> None:
    payloads = [p for p, _ in batch_in]
    keys = [k for _, k in batch_in]
    batch = _decode(payloads, keys)
    rows = {int(i): row for row, i in enumerate(batch.index.tolist())}
    rejects = {r.index: r for r in batch.rejects}
    for i, (payload, key) in enumerate(batch_in):
        expected, reading = _reference(payload, key)
        if expected is not None:
            assert i in rejects, (payload, key, expected)
            assert rejects[i].reason is expected, (payload, key, rejects[i])
            assert rejects[i].detail
            continue
        assert reading is not None and i in rows, (payload, key, rejects.get(i))
        row = rows[i]
        assert batch.device_ids[row] == reading.device_id
        assert int(batch.ts_ms[row]) == reading.ts
        np.testing.assert_array_equal(batch.values[row], np.asarray(reading.values, dtype=np.float32))
        assert batch.channels[row] == reading.channels


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=8).filter(str.strip),
                          st.integers(LIMITS.ts_min_ms, NOW),
                          st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                   min_size=3, max_size=3)), max_size=20))
def test_valid_readings_round_trip_exactly(rows: list[tuple[str, int, list[float]]]) -> None:
    payloads: list[bytes | None] = [_msg(device_id=d, ts=ts, values=v) for d, ts, v in rows]
    batch = _decode(payloads, [d.encode() for d, _, _ in rows])
    assert not batch.rejects
    assert batch.device_ids == [d for d, _, _ in rows]
    assert batch.ts_ms.tolist() == [ts for _, ts, _ in rows]
    assert batch.values.tolist() == [v for _, _, v in rows]  # float32-exact inputs survive unchanged


def _near_valid() -> list[tuple[bytes, bytes | None]]:
    """Readings one field away from valid, each with no key, its own key and another key."""
    out: list[tuple[bytes, bytes | None]] = []
    devices: list[Any] = ["pump-7", "", " \t", "\x1f", "é", "x" * 256, "x" * 257, 7, None]
    stamps: list[Any] = [NOW, NOW + 60_001, LIMITS.ts_min_ms - 1, float(NOW), True, str(NOW)]
    values: list[Any] = [[1, 2.5, 3], [1, 2], [1, 2, 3, 4], [1, True, 3], [1, None, 3], [1e39, 0, 0], "123"]
    for device in devices:
        for ts in stamps:
            for vals in values:
                for extra in ({}, {"channels": None}, {"channels": ["a", "b", "c"]}, {"channels": ["a"]}):
                    payload = json.dumps({"device_id": device, "ts": ts, "values": vals, **extra}).encode()
                    own = device.encode() if isinstance(device, str) else None
                    out += [(payload, None), (payload, own), (payload, b"other")]
    return out


def test_fast_path_decides_as_the_exact_checks_do() -> None:
    """decode_batch takes plain readings on a fast path: it must accept exactly what parse_reading accepts."""
    from liquidstream.pipeline.wire.checks import Rejected, parse_reading

    cases = _near_valid()
    batch = _decode([p for p, _ in cases], [k for _, k in cases])
    rows = {i: row for row, i in enumerate(batch.index.tolist())}
    rejects = {r.index: r for r in batch.rejects}
    accepted = 0
    for i, (payload, key) in enumerate(cases):
        try:
            device, ts, vals, names = parse_reading(payload, key, LIMITS, LIMITS.ts_min_ms, NOW + 60_000)
        except Rejected as rej:
            assert i in rejects and (rejects[i].reason, rejects[i].detail) == (rej.reason, rej.detail), payload
            continue
        if i in rejects:  # only the batch-wide finiteness check rejects what parse_reading lets through
            assert rejects[i].reason is R.NON_FINITE, (payload, rejects[i])
            continue
        row, accepted = rows[i], accepted + 1
        assert (batch.device_ids[row], int(batch.ts_ms[row]), batch.channels[row]) == (device, ts, names)
        np.testing.assert_array_equal(batch.values[row], np.asarray(vals, dtype=np.float32))
    assert accepted >= 4 and len(rejects) > len(cases) // 2  # both outcomes exercised
