"""Input mapping (liquidstream.pipeline.wire.mapping, reshape, assembly): other JSON shapes read as readings with the
same checks and dead-letter reasons, and the same readings in any shape give the same predictions."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from liquidstream.pipeline.cli.entry import main
from liquidstream.pipeline.offline.replay import ReplayConfig, run_replay
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.assembly import assemble_long
from liquidstream.pipeline.wire.checks import DecodeLimits, Rejected
from liquidstream.pipeline.wire.codec import decode_batch
from liquidstream.pipeline.wire.mapping import InputMapping
from liquidstream.pipeline.wire.reshape import event_time_ms

T0 = 1_767_225_600_000
NOW = T0 + 3_600_000
WIDE = InputMapping(shape="wide", device_field="sensor", time_field="time", time_unit="iso8601",
                    channel_fields=("temp", "rpm"))


def _limits(mapping: InputMapping, require_key: bool = False) -> DecodeLimits:
    return DecodeLimits(n_channels=2, max_payload_bytes=4096, ts_min_ms=0, max_future_ms=60_000,
                        require_key=require_key, mapping=mapping)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def test_time_units() -> None:
    assert event_time_ms(T0, "ms", "ts") == T0
    assert event_time_ms(T0 / 1000 + 0.25, "s", "t") == T0 + 250
    assert event_time_ms("2026-01-01T01:00:00+01:00", "iso8601", "t") == T0
    for value, unit, words in ((1.5, "ms", "integer"), ("x", "s", "number"), (True, "s", "number"),
                               ("2026-01-01T00:00:00", "iso8601", "no zone"), ("soon", "iso8601", "not ISO 8601"),
                               (T0, "iso8601", "ISO 8601 string")):
        with pytest.raises(Rejected, match=words) as info:
            event_time_ms(value, unit, "t")
        assert info.value.reason.value == "schema"


def test_wide_shape_meets_the_same_checks_as_a_reading() -> None:
    def msg(**over: Any) -> bytes:
        return json.dumps({"sensor": "p-7", "time": _iso(T0), "temp": 41.2, "rpm": 1480, "other": "x"} | over).encode()

    payloads = [msg(), msg(temp=float("nan")), msg(rpm="fast"), msg(time="2026-01-01T00:00:00"), msg(sensor=""),
                json.dumps({"sensor": "p-7", "time": _iso(T0), "temp": 1.0}).encode(), b"{", msg(time=_iso(NOW * 2))]
    batch = decode_batch(payloads, None, _limits(WIDE), NOW)
    assert batch.device_ids == ["p-7"] and batch.ts_ms.tolist() == [T0]
    assert batch.values.tolist() == [pytest.approx([41.2, 1480])]
    assert batch.channels == [["temp", "rpm"]]
    assert [(r.index, r.reason.value) for r in batch.rejects] == [
        (1, "non_finite"), (2, "schema"), (3, "schema"), (4, "schema"), (5, "schema"), (6, "malformed_json"),
        (7, "bad_timestamp")]
    assert [r.detail for r in batch.rejects[:5]] == [
        "values[0] is NaN", "rpm must be a number, got 'fast'", "time '2026-01-01T00:00:00' has no zone (add Z or "
        "+HH:MM)", "device_id is empty", "rpm is missing"]


def test_device_id_from_the_message_key() -> None:
    mapping = InputMapping(shape="wide", device_field="@key", time_unit="s", channel_fields=("a", "b"))
    payload = json.dumps({"ts": T0 / 1000, "a": 1, "b": 2}).encode()
    batch = decode_batch([payload, payload], [b"pump-1", None], _limits(mapping, require_key=True), NOW)
    assert batch.device_ids == ["pump-1"]
    assert [(r.index, r.reason.value) for r in batch.rejects] == [(1, "key_mismatch")]


def test_renamed_native_fields_and_settings_validation() -> None:
    mapping = InputMapping(device_field="id", time_field="t", time_unit="s")
    assert not mapping.native
    batch = decode_batch([b'{"id": "a", "t": 1767225600, "values": [1, 2]}'], None, _limits(mapping), NOW)
    assert batch.device_ids == ["a"] and batch.ts_ms.tolist() == [T0]
    with pytest.raises(ValidationError, match="channel_fields"):
        InputMapping(shape="wide")
    with pytest.raises(ValidationError, match="repeats"):
        InputMapping(shape="long", channel_fields=("a", "a"))


def test_long_shape_assembles_per_device_and_time() -> None:
    mapping = InputMapping(shape="long", device_field="device", channel_fields=("temp", "rpm"))

    def part(dev: str, ts: int, channel: str, value: Any) -> bytes:
        return json.dumps({"device": dev, "ts": ts, "channel": channel, "value": value}).encode()

    payloads = [part("a", T0, "rpm", 2), part("b", T0, "temp", 5), part("a", T0, "temp", 1),  # a complete at 2
                part("a", T0, "temp", 9),  # a repeated channel: duplicate
                part("b", T0, "volts", 1), part("b", T0 + 1, "rpm", 6), b"null",  # unknown channel; b@T0+1 partial
                part("c", T0, "temp", float("nan")), part("c", T0, "rpm", 1)]  # assembled, then non_finite
    batch, assembled = assemble_long(payloads, None, _limits(mapping), NOW)
    assert batch.index.tolist() == [2] and batch.values.tolist() == [[1.0, 2.0]] and assembled == 2
    assert [(r.index, r.reason.value) for r in batch.rejects] == [
        (1, "incomplete"), (3, "duplicate"), (4, "schema"), (5, "incomplete"), (6, "schema"), (7, "non_finite"),
        (8, "non_finite")]
    assert assembled + len(batch.rejects) == len(payloads)  # every message is in a reading or dead-lettered


def _shapes(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """One fleet's readings in the three shapes (the long one shuffled across devices and channels)."""
    rng = random.Random(4)
    native, wide, long = [], [], []
    for k in range(120):
        dev, ts = f"dev-{k % 3}", T0 + 1000 * k + rng.randint(0, 400)
        temp, rpm = round(40 + rng.gauss(0, 1), 3), round(1500 + rng.gauss(0, 20), 1)
        native.append({"device_id": dev, "ts": ts, "values": [temp, rpm]})
        wide.append({"sensor": dev, "time": _iso(ts), "temp": temp, "rpm": rpm, "site": "north"})
        long.extend([{"device": dev, "ts": ts / 1000, "channel": "rpm", "value": rpm},
                     {"device": dev, "ts": ts / 1000, "channel": "temp", "value": temp}])
    for i in range(0, len(long) - 6, 6):  # shuffle within small windows: channels and devices interleave
        window = long[i:i + 6]
        rng.shuffle(window)
        long[i:i + 6] = window
    out = {}
    for name, rows, flags in (("native", native, []),
                              ("wide", wide, ["--shape", "wide", "--device-field", "sensor", "--time-field", "time",
                                              "--time-unit", "iso8601", "--channel-fields", "temp,rpm"]),
                              ("long", long, ["--shape", "long", "--device-field", "device", "--time-unit", "s",
                                              "--channel-fields", "temp,rpm"])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = (path, flags)
    return out


def test_the_same_readings_in_every_shape_give_the_same_predictions(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    results = {}
    for name, (path, flags) in _shapes(tmp_path).items():
        out = tmp_path / f"out-{name}"
        assert main(["replay", "--input", str(path), "--out", str(out), "--quiet", *flags]) == 0
        preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        results[name] = sorted((p["device_id"], p["ts"], p["forecast"], p["score"]) for p in preds)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["predictions"] == 120 and summary["invalid"] == 0
    capsys.readouterr()
    assert results["wide"] == results["native"]
    assert results["long"] == results["native"]
    channels_named = json.loads((tmp_path / "out-wide" / "summary.json").read_text())["channels"]
    assert channels_named == 2


def test_mapping_comes_from_the_environment_and_flags_override_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQUIDSTREAM_MAPPING__SHAPE", "wide")
    monkeypatch.setenv("LIQUIDSTREAM_MAPPING__CHANNEL_FIELDS", '["temp", "rpm"]')
    assert Settings().mapping.channel_fields == ("temp", "rpm")
    settings = Settings(mapping={"device_field": "@key"})
    assert (settings.mapping.shape, settings.mapping.device_field) == ("wide", "@key")
    with pytest.raises(ValidationError):
        run_replay(Settings(mapping={"shape": "sideways"}), Path("x"), Path("y"), ReplayConfig(), show=False)


def test_the_faust_app_alone_refuses_the_long_shape_with_one_line() -> None:
    from liquidstream.pipeline.errors import ConfigurationError
    from liquidstream.pipeline.faust.app import build_app

    settings = Settings(guarantee="at_least_once", mapping={"shape": "long", "channel_fields": ["a", "b"]})
    with pytest.raises(ConfigurationError, match="faust app does not read the long input shape"):
        build_app(settings)  # before loading a model or connecting
    assert DecodeLimits.from_settings(settings, 2).mapping.shape == "long"  # the worker, trainer, files
