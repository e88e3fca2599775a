"""The smoothed level rule, re-basing at alert close and the commissioning reference, through the operator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.errors import ConfigError, StateFormatError
from liquidstream.operators.smoothed_level import LEVEL_FIELDS
from liquidstream.operators.state.store import DeviceStateStore

CUDA = torch.cuda.is_available()
T0 = 1_700_000_000_000
C = 3
#: Forecast-deviation and sustained triggers off: these tests are about the level rule alone.
QUIET = {"min_threshold": 1e6, "threshold_sigma": 1e3, "sustained_ratio": 1e6}
LEVEL = {**QUIET, "reference_events": 100, "stats_alpha": 0.002, "level_sigma": 5.0, "hold_sigma": 4.0,
         "learn_calm_channels": True, "max_alert_s": 1e6, "stuck_after": 1000}


def make_op(device: str = "cpu", **kw: Any) -> LiquidOperator:
    torch.manual_seed(0)
    return LiquidOperator(Forecaster(n_channels=C, hidden_size=8, cell="cfc", head_units=16), OperatorSettings(**kw),
                          device=device)


def noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, C)).astype(np.float32)


def run(op: LiquidOperator, v: np.ndarray, start: int = 0) -> tuple[np.ndarray, list[int]]:
    """One device, one reading per second: is_alert per reading and the readings that opened an alert."""
    res = op.process(["d"] * len(v), T0 + 1000 * (start + np.arange(len(v))), v)
    return res.is_alert, [start + a.index for a in res.alerts]


def row(op: LiquidOperator) -> dict[str, np.ndarray]:
    r = int(op.store.lookup(["d"])[0])
    return {k: t[r].cpu().numpy().copy() for k, t in op.store.tensors.items()}


def test_smoothing_catches_a_small_persistent_shift_the_raw_rule_misses() -> None:
    v = noise(350, seed=1)
    v[250:, 0] += 2.5  # 2.5 standard deviations, for good: rarely past 5 on one reading, always on average
    raw, _ = run(make_op(**LEVEL), v)
    smooth, _ = run(make_op(**LEVEL, level_smoothing=0.2), v)
    assert not raw[100:250].any() and not smooth[100:250].any(), "no false alarm on plain noise"
    assert smooth[260:].mean() > 0.9, "the moving average sits ~7 of its own spreads away"
    assert raw[260:].mean() < 0.3, "control: single readings seldom pass 5 standard deviations"


def test_smoothed_spread_is_small_for_noise_and_not_for_a_slow_wander() -> None:
    v = noise(100, seed=2)
    v[:, 1] = np.sin(np.arange(100) / 15.0)  # a slow wander (period ~94 readings), no noise
    op = make_op(**LEVEL, level_smoothing=0.2)
    run(op, v)
    ratio = np.sqrt(row(op)["level_var"] / row(op)["var"])
    assert 0.2 < ratio[0] < 0.5, f"white noise: about sqrt(0.2 / 1.8) = 0.33 of the raw spread, got {ratio[0]}"
    assert ratio[1] > 0.8, f"a slow wander keeps most of its spread, got {ratio[1]}"


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_rebase_on_close_accepts_the_state_after_an_expired_alert(smoothing: float) -> None:
    v = noise(300, seed=3)
    v[150:, 0] += 12.0  # a permanent step: the alert expires after max_alert_s
    kw = {**LEVEL, "level_smoothing": smoothing, "max_alert_s": 30.0, "cooldown_s": 10.0}
    _, kept = run(make_op(**kw), v)
    _, rebased = run(make_op(**kw, rebase_on_close=True), v)
    assert kept[0] == rebased[0] and 150 <= kept[0] <= 153
    assert len(kept) >= 2, "control: without re-basing the level is learnt slowly and the alert reopens"
    assert len(rebased) == 1, "re-based at close: the new level is the device's normal"


def test_reference_readings_all_teach_the_statistics_even_inside_an_alert() -> None:
    v = noise(100, seed=4)
    v[50:, 0] += 10.0  # a step inside the reference period opens an alert there
    states = {}
    for name, kw in (("alerting", LEVEL), ("silent", {**LEVEL, "level_sigma": 1e6, "hold_sigma": 1e6})):
        op = make_op(**kw)
        _, opened = run(op, v)
        states[name] = (opened, row(op))
    (opened, alerting), (silent_opened, silent) = states["alerting"], states["silent"]
    assert opened and not silent_opened
    np.testing.assert_array_equal(alerting["mean"], silent["mean"])
    np.testing.assert_array_equal(alerting["var"], silent["var"])


def test_state_fields_only_when_on_and_snapshot_round_trip() -> None:
    off, on = make_op(**LEVEL), make_op(**LEVEL, level_smoothing=0.2, rebase_on_close=True)
    assert "level_ema" not in off.store.tensors and "level_var" in on.store.tensors
    per_row = {k: op.store.nbytes() / op.store.capacity for k, op in (("off", off), ("on", on))}
    assert per_row["on"] - per_row["off"] == 2 * 4 * C, "two float32 per channel, only when on"
    v = noise(200, seed=5)
    v[120:160, 1] += 3.0
    head, tail = v[:130], v[130:]
    run(on, head)
    ref = on.process(["d"] * len(tail), T0 + 1000 * (130 + np.arange(len(tail))), tail)
    src, dst = make_op(**LEVEL, level_smoothing=0.2, rebase_on_close=True), make_op(**LEVEL, level_smoothing=0.2)
    run(src, head)
    dst.store.restore(src.store.snapshot())
    got = dst.process(["d"] * len(tail), T0 + 1000 * (130 + np.arange(len(tail))), tail)
    assert ref.is_alert.any()
    np.testing.assert_array_equal(ref.is_alert[:25], got.is_alert[:25])  # same state; rebase differs only later
    with pytest.raises(StateFormatError, match="level_ema"):
        on.store.restore(off.store.snapshot())  # a snapshot without the option's state does not restore into it


def test_batch_equals_one_at_a_time_with_the_options_on() -> None:
    rng = np.random.default_rng(6)
    ids = [f"d{i % 3}" for i in range(3 * 180)]
    ts = np.repeat(T0 + 1000 * np.arange(180), 3)
    v = rng.standard_normal((len(ids), C)).astype(np.float32)
    v[3 * 130:3 * 160, 0] += 3.0  # every device: a shift that opens and closes an alert
    kw = {**LEVEL, "level_smoothing": 0.2, "rebase_on_close": True}
    whole, single = make_op(**kw), make_op(**kw)
    full = whole.process(ids, ts, v)
    one = np.concatenate([single.process([ids[i]], ts[i:i + 1], v[i:i + 1]).is_alert for i in range(len(ids))])
    assert full.is_alert.any()
    np.testing.assert_array_equal(full.is_alert, one)
    for name in ("mean", "level_ema", "level_var"):
        np.testing.assert_allclose(whole.store.tensors[name].numpy(), single.store.tensors[name].numpy(), rtol=1e-6)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_matches_cpu_with_the_options_on() -> None:
    v = noise(300, seed=7)
    v[150:220, 0] += 2.5
    kw = {**LEVEL, "level_smoothing": 0.2, "rebase_on_close": True}
    cpu, gpu = make_op(**kw), make_op("cuda", **kw)
    flags_cpu, _ = run(cpu, v)
    flags_gpu, _ = run(gpu, v)
    assert flags_cpu.any()
    np.testing.assert_array_equal(flags_cpu, flags_gpu)
    for name in ("mean", "level_ema", "level_var"):
        np.testing.assert_allclose(cpu.store.tensors[name].numpy(), gpu.store.tensors[name].cpu().numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_level_smoothing_validated_and_store_extra_fields() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="level_smoothing"):
            OperatorSettings(level_smoothing=bad)
    store = DeviceStateStore(4, 2, initial_capacity=2, extra_fields=LEVEL_FIELDS)
    store.rows_for(["a"])
    store.tensors["level_var"][0] = torch.tensor([2.0, 3.0])
    other = DeviceStateStore(4, 2, extra_fields=LEVEL_FIELDS)
    assert other.restore(store.snapshot()) == ["a"]
    assert other.tensors["level_var"][int(other.lookup(["a"])[0])].tolist() == [2.0, 3.0]
