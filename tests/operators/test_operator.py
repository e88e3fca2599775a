"""LiquidOperator end to end: batching invariance, snapshot continuity, input validation, dt, devices (each on both
step paths, the tensor waves and the compiled per-device step)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings, StepResult
from liquidstream.operators.errors import InputError
from liquidstream.operators.result import EventStatus
from tests.operators.conftest import BOTH_PATHS

pytestmark = BOTH_PATHS  # every test here is a contract of the operator, whichever step path computes a batch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
T0 = 1_700_000_000_000
C = 3




def make_op(cell: str = "cfc", device: str = "cpu", **kw: Any) -> LiquidOperator:
    torch.manual_seed(0)
    model = Forecaster(n_channels=C, hidden_size=8, cell=cell, head_units=16)
    with torch.no_grad():  # a non-trivial head, so forecasts depend on the hidden state and dt
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    kw.setdefault("warmup_events", 8)
    kw.setdefault("level_rule", True)  # the stuck rule exercises alerts even in short streams
    return LiquidOperator(model, OperatorSettings(**kw), device=device, initial_capacity=4)


def stream(n_dev: int = 5, n: int = 30, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Interleaved readings of several devices, irregular gaps, in event-time order per device; spikes and a
    stuck channel in it."""
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    ts: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for d in range(n_dev):
        t = T0 + np.cumsum(rng.integers(300, 3000, size=n))
        v = np.sin(np.arange(n)[:, None] * (0.3 + 0.1 * d) + np.arange(C)) + 0.05 * rng.standard_normal((n, C))
        v[n // 2 + d % 3, d % C] += 12.0  # an anomaly after warm-up
        if d % 2 == 0:
            v[n // 3:n // 3 + 10, (d + 1) % C] = 0.5  # a stuck channel: the rule's alert
        ids += [f"dev-{d}"] * n
        ts.append(t)
        vals.append(v)
    ts_a, vals_a = np.concatenate(ts), np.concatenate(vals).astype(np.float32)
    order = np.argsort(ts_a, kind="stable")  # interleave the devices by event time
    return [ids[i] for i in order], ts_a[order], vals_a[order]


def concat(parts: list[StepResult]) -> dict[str, np.ndarray]:
    keys = ("status", "long_gap", "forecast", "forecast_std", "horizon_s", "score", "threshold", "is_alert",
            "anomaly_score")
    return {k: np.concatenate([getattr(p, k) for p in parts]) for k in keys}


def alerts_of(parts: list[StepResult]) -> list[tuple[Any, ...]]:
    out, offset = [], 0
    for p in parts:
        out += [(a.device_id, a.ts_ms, a.reason, a.channels, a.severity, a.index + offset) for a in p.alerts]
        offset += len(p)
    return sorted(out, key=lambda a: a[-1])  # (a batch lists its alerts in wave order, not input order)


def assert_results_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tol: float = 1e-5) -> None:
    for k in ("status", "long_gap", "is_alert"):
        assert np.array_equal(a[k], b[k]), k
    for k in ("forecast", "forecast_std", "horizon_s", "score", "threshold", "anomaly_score"):
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, equal_nan=True, err_msg=k)


def store_state(op: LiquidOperator) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for dev in op.store.device_ids():
        r = int(op.store.lookup([dev])[0])
        out[dev] = {k: v[r].cpu().numpy() for k, v in op.store.tensors.items()} | {
            k: np.array(v[r]) for k, v in op.store.host.items()}
    return out


def assert_states_close(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]) -> None:
    assert a.keys() == b.keys()
    for dev in a:
        for k in a[dev]:
            np.testing.assert_allclose(a[dev][k].astype(np.float64), b[dev][k].astype(np.float64), rtol=1e-5,
                                       atol=1e-5, err_msg=f"{dev}.{k}")


# ------------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("cell", ["cfc", "liquid"])
def test_batch_equals_one_at_a_time_and_any_split(cell: str) -> None:
    ids, ts, vals = stream()
    whole = make_op(cell)
    full = whole.process(ids, ts, vals)
    assert len(full.alerts) >= 3, "the scenario must exercise alerts"
    single = make_op(cell)
    singles = [single.process([ids[i]], ts[i:i + 1], vals[i:i + 1]) for i in range(len(ids))]
    assert_results_close(concat([full]), concat(singles))
    assert alerts_of([full]) == alerts_of(singles)
    assert_states_close(store_state(whole), store_state(single))
    rng = np.random.default_rng(1)
    for _ in range(2):
        cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=6, replace=False))
        split = make_op(cell)
        parts = [split.process(ids[a:b], ts[a:b], vals[a:b])
                 for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
        assert_results_close(concat([full]), concat(parts))
        assert alerts_of([full]) == alerts_of(parts)
        assert_states_close(store_state(whole), store_state(split))


def test_snapshot_restore_continues_identically() -> None:
    """Every field (the likelihoods', the alert machine's, a per-device commissioning) survives a snapshot bit for
    bit, and the restored operator continues exactly as the one that never stopped."""
    ids, ts, vals = stream(n=60, seed=3)
    cut = len(ids) // 2

    def op() -> LiquidOperator:
        made = make_op()
        made.set_commissioning(["dev-1"], [25])
        return made

    ref = op()
    ref.process(ids[:cut], ts[:cut], vals[:cut])
    tail_ref = ref.process(ids[cut:], ts[cut:], vals[cut:])
    src = op()
    src.process(ids[:cut], ts[:cut], vals[:cut])
    dst = make_op()  # no commissioning set here: it arrives with the snapshot
    dst.store.restore(src.store.snapshot())
    for dev, fields in store_state(src).items():
        assert {"d_s2", "a_cal", "l_v", "lik_n", "commissioning", "alert_age", "cooldown"} <= fields.keys()
        for k, v in fields.items():
            assert np.array_equal(v, store_state(dst)[dev][k]), f"{dev}.{k}"
    tail = dst.process(ids[cut:], ts[cut:], vals[cut:])
    assert len(tail_ref.alerts) > 0
    assert_results_close(concat([tail_ref]), concat([tail]), tol=0.0)
    assert alerts_of([tail_ref]) == alerts_of([tail])
    end_ref, end = store_state(ref), store_state(dst)
    assert all(np.array_equal(end_ref[d][k], end[d][k]) for d in end_ref for k in end_ref[d])


# ------------------------------------------------------------------------------------------------ inputs
def test_inputs_not_mutated() -> None:
    ids, ts, vals = stream(n_dev=2, n=12)
    ids_c, ts_c, vals_c = list(ids), ts.copy(), vals.copy()
    assert vals.dtype == np.float32 and ts.dtype == np.int64  # no conversion copy inside process
    res = make_op().process(ids, ts, vals)
    assert ids == ids_c and np.array_equal(ts, ts_c) and np.array_equal(vals, vals_c)
    res.forecast[:] = 0  # outputs are owned by the caller, not views of the inputs
    assert np.array_equal(vals, vals_c)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_reading_names_device(bad: float) -> None:
    op = make_op()
    vals = np.ones((3, C), np.float32)
    vals[1, 2] = bad
    with pytest.raises(InputError, match="'sensor-7'"):
        op.process(["ok-1", "sensor-7", "ok-2"], T0 + np.arange(3), vals)
    assert len(op.store) == 0, "a rejected batch must not create device state"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_timestamp_names_device(bad: float) -> None:
    op = make_op()
    ts = np.array([T0, bad, T0], dtype=np.float64)
    with pytest.raises(InputError, match="'sensor-7'"):
        op.process(["ok-1", "sensor-7", "ok-2"], ts, np.ones((3, C), np.float32))  # type: ignore[arg-type]
    assert len(op.store) == 0


@pytest.mark.parametrize(("n_ids", "ts_shape", "val_shape"), [
    (3, (3,), (3, C + 1)), (3, (2,), (3, C)), (3, (3,), (3,)), (3, (3, 1), (3, C)), (2, (3,), (3, C))])
def test_wrong_shapes(n_ids: int, ts_shape: tuple[int, ...], val_shape: tuple[int, ...]) -> None:
    op = make_op()
    with pytest.raises(InputError):
        op.process([f"d{i}" for i in range(n_ids)], np.full(ts_shape, T0, np.int64), np.ones(val_shape, np.float32))
    assert len(op.store) == 0


def test_empty_batch() -> None:
    op = make_op()
    res = op.process([], np.zeros(0, np.int64), np.zeros((0, C), np.float32))
    assert len(res) == 0 and res.forecast.shape == (0, C) and res.alerts == []
    assert res.score.shape == res.is_alert.shape == res.status.shape == (0,)
    assert len(op.store) == 0


# ------------------------------------------------------------------------------------------------ dt
def test_dt_changes_state_and_forecast() -> None:
    op = make_op()
    n = 10
    vals = np.tile(np.array([[0.5, -1.0, 2.0]], np.float32), (n, 1)) + np.linspace(0, 1, n, dtype=np.float32)[:, None]
    op.process(["fast"] * n, T0 + 1000 * np.arange(n), vals)
    res = op.process(["slow"] * n, T0 + 30_000 * np.arange(n), vals)
    st = store_state(op)
    for k in ("mean", "var", "x_last"):  # identical readings give identical statistics ...
        np.testing.assert_allclose(st["fast"][k], st["slow"][k], rtol=1e-6)
    assert np.abs(st["fast"]["h"] - st["slow"]["h"]).max() > 1e-3  # ... but the gaps give different states
    assert st["fast"]["gap_ema"] == pytest.approx(1.0) and st["slow"]["gap_ema"] == pytest.approx(30.0)
    fast_last = op.process(["fast"], np.array([T0 + 1000 * n]), vals[-1:])
    assert np.abs(fast_last.forecast[0] - res.forecast[-1]).max() > 1e-4
    # The horizon is the device's usual gap, and forecast_ts_ms follows from it.
    assert res.horizon_s[1:].tolist() == pytest.approx([30.0] * (n - 1))
    assert res.forecast_ts_ms[-1] == T0 + 30_000 * (n - 1) + 30_000


def test_dropped_events_have_nan_outputs() -> None:
    op = make_op()
    res = op.process(["a", "a", "a"], np.array([T0, T0, T0 - 5]), np.ones((3, C), np.float32))
    assert res.status.tolist() == [EventStatus.OK, EventStatus.DUPLICATE_DROPPED, EventStatus.FIRST]
    res = op.process(["a", "a"], np.array([T0 - 5, T0 + 1000]), np.ones((2, C), np.float32))
    assert res.status.tolist() == [EventStatus.LATE_DROPPED, EventStatus.OK]
    assert res.applied.tolist() == [False, True]
    assert np.isnan(res.forecast[0]).all() and np.isnan(res.score[0]) and not res.is_alert[0]
    assert np.isfinite(res.forecast[1]).all()


def test_swap_model_keeps_state_and_checks_shape() -> None:
    op = make_op()
    ids, ts, vals = stream(n_dev=2, n=6)
    op.process(ids, ts, vals)
    before = store_state(op)
    with pytest.raises(InputError):
        op.swap_model(Forecaster(n_channels=C, hidden_size=9), "v2")
    torch.manual_seed(5)
    op.swap_model(Forecaster(n_channels=C, hidden_size=8, cell="cfc", head_units=16), "v2")
    assert op.model_version == "v2"
    assert_states_close(before, store_state(op))


def test_evict_idle_uses_state_ttl() -> None:
    op = make_op(state_ttl_s=10.0)
    op.process(["old", "new"], np.array([T0, T0 + 9_000]), np.ones((2, C), np.float32))
    assert op.evict_idle(T0 + 15_000) == ["old"]
    assert op.store.device_ids() == ["new"]


# ------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device", DEVICES)
def test_device_parity_with_cpu(device: str) -> None:
    ids, ts, vals = stream(n_dev=4, n=20, seed=7)
    cpu = make_op(device="cpu").process(ids, ts, vals)
    other = make_op(device=device).process(ids, ts, vals)
    assert_results_close(concat([cpu]), concat([other]), tol=1e-4)
    assert [(a.device_id, a.ts_ms, a.reason) for a in cpu.alerts] == [
        (a.device_id, a.ts_ms, a.reason) for a in other.alerts]
