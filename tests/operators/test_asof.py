"""Forecast at any instant (``LiquidOperator.forecast_at``): equal to the forecast the next reading is scored
against when it arrives at that instant (under every gap policy), equal to a prediction's own forecast at its
horizon, and read-only (the snapshot bytes and host clocks do not change)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings, fused_step
from liquidstream.operators.errors import DeviceQueryError

T0 = 1_767_225_600_000  # epoch ms


def trained_op(settings: OperatorSettings | None = None, seed: int = 0) -> LiquidOperator:
    torch.manual_seed(seed)
    model = Forecaster(n_channels=3, hidden_size=8, cell="cfc", time_scale_s=2.0)
    for p in model.head[-1].parameters():  # a head that is not persistence, so the gap and state matter
        torch.nn.init.normal_(p, std=0.3)
    return LiquidOperator(model, settings or OperatorSettings(max_gap_s=30.0))


def feed_irregular(op: LiquidOperator, devices: list[str], n: int, seed: int = 1) -> dict[str, int]:
    """n readings per device at irregular gaps (0.2 .. 5 s); returns each device's last event time, ms."""
    rng = np.random.default_rng(seed)
    last = {}
    for d in devices:
        ts = T0 + np.cumsum(rng.integers(200, 5000, n))
        values = (np.sin(ts[:, None] / 7000.0 + np.arange(3)) + 0.1 * rng.standard_normal((n, 3))).astype(np.float32)
        op.process([d] * n, ts, values)
        last[d] = int(ts[-1])
    return last


def spy_scoring_forecasts(monkeypatch: pytest.MonkeyPatch) -> dict[int, np.ndarray]:
    """Per wave, the raw-unit forecasts [B, C] that ``process`` scored the wave's readings against."""
    seen: dict[int, np.ndarray] = {}
    real = fused_step.forecast_reading

    def spy(model: Forecaster, h: torch.Tensor, x_last: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
            dt: torch.Tensor) -> Any:
        out = real(model, h, x_last, mean, var, dt)
        mu, _, _, sc = out
        raw = (mean + mu * sc).t().numpy().copy()
        seen[len(seen)] = raw  # [B, C], columns in the wave's order
        return out

    monkeypatch.setattr(fused_step, "forecast_reading", spy)
    return seen


@pytest.mark.parametrize("policy", ["decay", "reset", "clamp"])
@pytest.mark.parametrize("gap_s", [1.7, 95.0])  # 95 s > max_gap_s = 30 s: a long gap under each policy
def test_forecast_at_is_the_forecast_the_next_reading_is_scored_against(
        monkeypatch: pytest.MonkeyPatch, policy: str, gap_s: float) -> None:
    op = trained_op(OperatorSettings(max_gap_s=30.0, gap_policy=policy))  # type: ignore[arg-type]
    last = feed_irregular(op, ["a", "b"], 40)
    at = [last["a"] + int(gap_s * 1000), last["b"] + 250]
    before = op.store.snapshot()
    asked = op.forecast_at(["a", "b"], at)
    assert op.store.snapshot() == before  # read-only
    assert asked.dt_s[0] == pytest.approx(min(gap_s, 30.0) if policy == "clamp" else gap_s)
    assert bool(asked.long_gap[0]) == (gap_s > 30.0)
    seen = spy_scoring_forecasts(monkeypatch)
    res = op.process(["b", "a"], np.array(at[::-1]), np.zeros((2, 3), np.float32))
    assert len(seen) == 1  # both readings in one wave: columns in the wave's (row) order
    rows = op.store.lookup(["a", "b"])
    order = np.argsort(rows)  # the planner orders a wave by store row
    scored = seen[0][np.argsort(order)]
    np.testing.assert_allclose(asked.forecast, scored, rtol=0, atol=1e-6)
    assert res.status.tolist() == [0, 0]


def test_forecast_at_the_horizon_equals_the_predictions_forecast() -> None:
    op = trained_op()
    ts = T0 + 1000 * np.arange(30)  # regular 1 s gaps: the usual gap (the horizon) is exactly 1 s
    values = np.random.default_rng(2).standard_normal((30, 3)).astype(np.float32)
    res = op.process(["d"] * 30, ts, values)
    assert res.horizon_s[-1] == 1.0
    asked = op.forecast_at(["d"], [int(ts[-1]) + 1000])
    np.testing.assert_allclose(asked.forecast[0], res.forecast[-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(asked.forecast_std[0], res.forecast_std[-1], rtol=1e-6, atol=1e-6)
    later = op.forecast_at(["d"], [int(ts[-1]) + 60_000])
    assert not np.allclose(later.forecast, asked.forecast)  # the gap matters to this model


def test_forecast_at_reports_the_devices_state() -> None:
    op = trained_op()
    last = feed_irregular(op, ["a"], 25)
    asked = op.forecast_at(["a"], [last["a"]])  # at the last reading itself: a gap of 0
    assert asked.dt_s.tolist() == [0.0] and asked.last_ts_ms.tolist() == [last["a"]]
    assert asked.readings.tolist() == [25] and asked.model_version == "untrained"
    mean = op.store.tensors["mean"][op.store.lookup(["a"])].numpy()
    np.testing.assert_array_equal(asked.normal_level, mean)
    assert asked.alert_open.tolist() == [False] and asked.alert_opened_ms.tolist() == [0]
    assert (asked.normal_spread > 0).all() and (asked.forecast_std > 0).all()


@pytest.mark.parametrize(("ids", "at", "reason"), [
    (["nobody"], [T0], "unknown"),
    (["fresh"], [T0], "no_reading"),
    (["a"], [T0], "before_last_reading"),
    (["a", "a"], [T0 + 10**9, T0 + 10**9], "invalid"),
])
def test_forecast_at_refuses_what_it_cannot_answer(ids: list[str], at: list[int], reason: str) -> None:
    op = trained_op()
    feed_irregular(op, ["a"], 5)
    op.set_commissioning(["fresh"], [0])  # a row without any reading
    before = op.store.snapshot()
    with pytest.raises(DeviceQueryError) as info:
        op.forecast_at(ids, at)
    assert info.value.reason == reason and info.value.device_id == ids[0]
    assert repr(ids[0]) in str(info.value)
    assert op.store.snapshot() == before
