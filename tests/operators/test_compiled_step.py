"""The compiled per-device step against the tensor waves: the same forecasts, scores, alerts, alert lifecycle and
stored state on irregular streams, across snapshots and restores between batches; and when each path runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings, StepResult
from liquidstream.operators.compiled import kernel
from tests.operators.test_operator import assert_results_close, assert_states_close, concat, store_state

T0 = 1_700_000_000_000
C = 3


def model(cell: str, **options: Any) -> Forecaster:
    torch.manual_seed(0)
    m = Forecaster(n_channels=C, hidden_size=8, cell=cell, cell_options=options, head_units=16, time_scale_s=0.7)
    with torch.no_grad():  # a non-trivial head (its last layer starts at zero) and cell
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def irregular(n_dev: int = 4, n: int = 300, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Devices with irregular gaps (a long one too), spikes, a level shift and a stuck channel, interleaved by event
    time, plus a duplicate and a late reading."""
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    ts, vals = [], []
    for d in range(n_dev):
        gaps = rng.integers(100, 4000, size=n)
        gaps[n // 4] = 900_000  # past max_gap_s (600 s): the gap policy applies
        t = T0 + np.cumsum(gaps)
        v = np.sin(np.arange(n)[:, None] * (0.2 + 0.05 * d) + np.arange(C)) + 0.1 * rng.standard_normal((n, C))
        v[n // 2, d % C] += 15.0  # a spike after warm-up
        v[n // 2 + 20:n // 2 + 50, (d + 1) % C] += 8.0  # a level shift: an alert that stays open a while
        if d % 2 == 0:
            v[n // 3:n // 3 + 12, (d + 2) % C] = 0.5  # a stuck channel
        ids += [f"dev-{d}"] * n
        ts.append(t)
        vals.append(v)
    ts_a, vals_a = np.concatenate(ts), np.concatenate(vals).astype(np.float32)
    order = np.argsort(ts_a, kind="stable")
    out_ids, out_ts, out_v = [ids[i] for i in order], ts_a[order], vals_a[order]
    out_ids += ["dev-0", "dev-1"]  # a duplicate of dev-0's last reading, a reading of dev-1 from long ago
    last0 = max(t for d, t in zip(out_ids, out_ts.tolist(), strict=False) if d == "dev-0")
    return out_ids, np.append(out_ts, [last0, T0]), np.vstack([out_v, out_v[:2]])


def closed_of(res: StepResult) -> list[tuple[Any, ...]]:
    return [(c.alert_id, c.ts_ms, c.readings, c.reason, c.max_duration, c.severity, c.index) for c in res.closed]


def opened_of(res: StepResult) -> list[tuple[Any, ...]]:
    return [(a.alert_id, a.reason, a.channels, a.severity, a.index) for a in res.alerts]


LEVEL: dict[str, Any] = {"level_rule": True}
RESET: dict[str, Any] = {"gap_policy": "reset", "commissioning_events": 30, "exit_after": 4}
RULES: dict[str, Any] = {"gap_policy": "clamp", "model_triggers": False, "level_rule": True,
                         "duplicate_policy": "accept", "late_policy": "accept"}
CASES = [("cfc", {}, LEVEL), ("cfc", {"backbone_activation": "silu", "backbone_layers": 2}, RESET),
         ("cfc", {}, RULES), ("liquid", {}, LEVEL), ("ltc", {"ode_unfolds": 3, "input_mapping": "linear"}, RESET)]


@pytest.mark.parametrize(("cell", "options", "settings"), CASES)
def test_compiled_step_matches_tensor_waves_across_snapshots(cell: str, options: dict[str, Any],
                                                              settings: dict[str, Any]) -> None:
    ids, ts, vals = irregular()
    cuts = [0, 37, 600, 601, 1000, len(ids)]  # batches of 1 to 563 readings
    ops: dict[str, LiquidOperator] = {}
    results: dict[str, list[StepResult]] = {"tensor": [], "compiled": []}
    for path in results:
        config = OperatorSettings(warmup_events=8, cooldown_events=10, step_path=path, **settings)
        op = LiquidOperator(model(cell, **options), config, initial_capacity=2)
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            results[path].append(op.process(ids[lo:hi], ts[lo:hi], vals[lo:hi]))
            assert op.last_step_path == path
            # Between batches the state goes through a snapshot into a fresh operator (a restart, a rebalance).
            fresh = LiquidOperator(op.model, op.settings, initial_capacity=2)
            fresh.store.restore(op.store.snapshot())
            op = fresh
        ops[path] = op
    tensor, compiled = results["tensor"], results["compiled"]
    assert sum(len(r.alerts) for r in tensor) >= 2 and sum(len(r.closed) for r in tensor) >= 2, "alerts must fire"
    assert_results_close(concat(tensor), concat(compiled))
    for a, b in zip(tensor, compiled, strict=True):
        assert opened_of(a) == opened_of(b)
        assert closed_of(a) == closed_of(b)
        np.testing.assert_allclose([c.peak_score for c in a.closed], [c.peak_score for c in b.closed], rtol=1e-5)
        np.testing.assert_allclose([x.score for x in a.alerts], [x.score for x in b.alerts], rtol=1e-5)
        for x, y in zip(a.alerts, b.alerts, strict=True):  # explanations: expected values and spreads (4 digits)
            if x.reason == "silence":
                continue
            assert x.explanation is not None and y.explanation is not None
            np.testing.assert_allclose([(c.expected, c.spread) for c in x.explanation.channels],
                                       [(c.expected, c.spread) for c in y.explanation.channels], rtol=2e-3)
    assert_states_close(store_state(ops["tensor"]), store_state(ops["compiled"]))


def test_auto_picks_the_compiled_step_for_narrow_batches_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import liquidstream.operators.operator as operator_module

    monkeypatch.setattr(operator_module, "COMPILED_MIN_READINGS_PER_DEVICE", 4.0)
    op = LiquidOperator(model("cfc"), OperatorSettings())
    x = np.zeros((8, C), np.float32)
    op.process(["a"] * 8, T0 + 1000 * np.arange(8), x)  # 8 readings of one device
    assert op.last_step_path == "compiled"
    op.process([f"d{i}" for i in range(8)], np.full(8, T0), x)  # one reading each of 8 devices
    assert op.last_step_path == "tensor"
    op.process(["a", "a", "a", "a", "b", "b", "b", "b"], T0 + 10_000 + np.arange(8), x)  # 4 per device
    assert op.last_step_path == "compiled"
    for settings, m in ((OperatorSettings(step_path="tensor"), model("cfc")),
                        (OperatorSettings(), model("cfc", mode="pure")),
                        (OperatorSettings(step_path="compiled"), model("cfc", mode="no_gate"))):
        other = LiquidOperator(m, settings)  # forced tensor; cells the kernel does not run stay on the tensor path
        other.process(["a"] * 8, T0 + 1000 * np.arange(8), x)
        assert other.last_step_path == "tensor"


def test_compiled_step_follows_weight_updates_and_swaps() -> None:
    ids, ts, vals = irregular(n_dev=2, n=60, seed=4)
    ops = {path: LiquidOperator(model("cfc"), OperatorSettings(step_path=path)) for path in ("tensor", "compiled")}
    half = len(ids) // 2
    for op in ops.values():
        op.process(ids[:half], ts[:half], vals[:half])
        with torch.no_grad():  # in place, as an optimiser step or load_state_dict does
            for p in op.model.parameters():
                p.mul_(1.1)
    a, b = (op.process(ids[half:-2], ts[half:-2], vals[half:-2]) for op in ops.values())
    assert_results_close(concat([a]), concat([b]))
    for op in ops.values():  # another model, the same one on both sides: the compiled step packs its weights afresh
        op.swap_model(model("cfc", backbone_units=32), "v2")
    a, b = (op.process(ids[-2:], ts[-2:] + 10**6, vals[-2:]) for op in ops.values())
    assert_results_close(concat([a]), concat([b]))
    assert ops["compiled"].last_step_path == "compiled"


def test_log_ndtr_is_exact_in_the_far_tail() -> None:
    """The likelihood's tail probability: log Phi(x) from the centre to the far tail, against float64 torch."""
    xs = np.concatenate([np.linspace(-5, 5, 101), -np.geomspace(5, 1e4, 200)])
    ref = torch.special.log_ndtr(torch.tensor(xs, dtype=torch.float64)).numpy()
    got = np.array([kernel._log_ndtr(float(x)) for x in xs])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert math.isfinite(kernel._log_ndtr(-1e30))


def test_tanh_approximation_is_within_float32_tolerance() -> None:
    x = np.linspace(-12, 12, 20_001, dtype=np.float32)
    got = np.array([kernel._tanh(v) for v in x], dtype=np.float64)
    ref = np.tanh(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-30)) < 5e-7


def test_kernel_imports_where_no_cache_folder_is_writable() -> None:
    """A read-only install (the k8s worker's root filesystem): numba finds no cache folder, and the kernel must still
    import and compile in memory instead of failing the import."""
    code = ("import numba.core.caching as c; c.CacheImpl._locator_classes = []\n"
            "from liquidstream.operators.compiled import kernel\n"
            "assert kernel._tanh._cache.__class__.__name__ == 'NullCache'\n"
            "print(float(kernel._tanh(kernel.F32(0.5))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert float(out.stdout) == pytest.approx(math.tanh(0.5), rel=1e-6)
