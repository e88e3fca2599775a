"""The step operator's channels-first serving path: the same functions as the row-form model, any layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import liquidstream.operators.fused_step as fused_step
from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings

T0 = 1_700_000_000_000
C, H = 3, 6


def perturbed(cell: str, **cell_options: Any) -> Forecaster:
    torch.manual_seed(0)
    model = Forecaster(n_channels=C, hidden_size=H, cell=cell, cell_options=cell_options, head_units=8).eval()
    with torch.no_grad():  # a non-trivial head (its last layer starts at zero) and cell
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


CELLS = [("cfc", {}), ("cfc", {"backbone_activation": "silu", "backbone_layers": 2}),
         ("cfc", {"backbone_layers": 0}), ("cfc", {"mode": "no_gate"}), ("ltc", {}), ("liquid", {})]


@pytest.mark.parametrize(("cell", "options"), CELLS)
def test_column_forecast_and_advance_match_row_form(cell: str, options: dict[str, Any]) -> None:
    model = perturbed(cell, **options)
    block = torch.randn(11, H + 4)  # h is a column view with a row stride, as in the state store
    h, x = block[:, 2:2 + H], torch.randn(11, C)
    dt = torch.tensor([0.0, 1e-3, 0.1, 0.5, 1.0, 3.0, 60.0, 1e4, 2.0, 0.2, 7.0])
    with torch.no_grad():
        mean, std, absolute = model.forecast_all(h, x, dt)
        mean_c, std_c, absolute_c = model.forecast_columns_all(h, x.t(), dt)
        new_h = model.advance(h, x, dt)
        out = torch.zeros(11, H + 4)
        model.advance_columns(h, x.t().contiguous(), dt, out[:, 1:1 + H])
    torch.testing.assert_close(mean_c, mean.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std_c, std.t(), rtol=1e-5, atol=1e-6)
    assert absolute is not None and absolute_c is not None
    torch.testing.assert_close(absolute_c, absolute.t(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(absolute, mean), "the absolute forecast has no skip from the last value"
    torch.testing.assert_close(out[:, 1:1 + H], new_h, rtol=1e-5, atol=1e-6)
    assert (out[:, 0] == 0).all() and (out[:, 1 + H:] == 0).all()


def test_column_forecast_follows_in_place_weight_updates() -> None:
    model = perturbed("cfc")
    h, x, dt = torch.randn(5, H), torch.randn(5, C), torch.rand(5)
    for _ in range(2):
        with torch.no_grad():
            model.head[0].bias.add_(0.5)  # in place, as an optimiser or load_state_dict does
            mean, _ = model.forecast(h, x, dt)
            mean_c, _ = model.forecast_columns(h, x.t(), dt)
        torch.testing.assert_close(mean_c, mean.t(), rtol=1e-5, atol=1e-6)


def stream(n_dev: int, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = [f"d{d}" for d in range(n_dev) for _ in range(n)]
    ts = np.concatenate([T0 + np.cumsum(rng.integers(200, 3000, n)) for _ in range(n_dev)])
    vals = rng.normal(size=(n_dev * n, C)).astype(np.float32)
    vals[n // 2::n, 0] += 15.0  # a spike per device, after warm-up
    for d in range(0, n_dev, 2):
        vals[d * n + n // 3:d * n + n // 3 + 12, 1] = 0.25  # a stuck channel on every other device: alerts
    order = np.argsort(ts, kind="stable")
    return [ids[i] for i in order], ts[order], vals[order]


@pytest.mark.parametrize("settings", [{"level_rule": True},
                                      {"gap_policy": "reset", "max_gap_s": 2.0, "level_rule": True,
                                       "model_triggers": False}])
def test_transposed_and_strided_waves_agree(monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any]) -> None:
    """Waves above ``TRANSPOSE_MIN_ROWS`` work on transposed copies, smaller ones on strided views of the
    gathered rows: results and stored state must not depend on which."""
    ids, ts, vals = stream(40, 60)
    runs = []
    for threshold in (0, 10**9):
        monkeypatch.setattr(fused_step, "TRANSPOSE_MIN_ROWS", threshold)
        op = LiquidOperator(perturbed("cfc"), OperatorSettings(warmup_events=6, **settings), initial_capacity=4)
        parts = [op.process(ids[lo:lo + 300], ts[lo:lo + 300], vals[lo:lo + 300]) for lo in range(0, len(ids), 300)]
        state = {k: v.clone() for k, v in op.store.tensors.items()}
        runs.append((parts, state, sum(len(p.alerts) for p in parts)))
    (a, sa, na), (b, sb, nb) = runs
    assert na == nb and na > 0
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.status, pb.status)
        np.testing.assert_array_equal(pa.is_alert, pb.is_alert)
        for k in ("forecast", "forecast_std", "score", "threshold", "horizon_s", "anomaly_score"):
            np.testing.assert_allclose(getattr(pa, k), getattr(pb, k), rtol=1e-5, atol=1e-6, equal_nan=True)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
