"""Training: sequence building, consistency of the training rollout with the serving operator, training steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.errors import ConfigError, InputError
from liquidstream.operators.training import MIN_HISTORY, Sequences, Trainer, initial_state, rollout_loss

T0 = 1_700_000_000_000




def test_from_columns_groups_sorts_pads() -> None:
    ids = ["b", "a", "b", "c", "a", "b", "a"]
    ts = np.array([T0 + 3000, T0 + 2500, T0 + 1000, T0, T0 + 1000, T0 + 1500, T0 + 1000])
    vals = np.arange(14, dtype=np.float32).reshape(7, 2)
    s = Sequences.from_columns(ids, ts, vals)
    assert s.device_ids == ["a", "b", "c"]
    assert s.values.shape == (3, 3, 2) and s.dt.shape == s.mask.shape == (3, 3)
    assert s.values.dtype == s.dt.dtype == torch.float32 and s.mask.dtype == torch.bool
    assert s.mask.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    # a: 1000 (index 4 or its duplicate 6; one of them), 2500 (index 1)
    assert s.values[0, 0].tolist() in (vals[4].tolist(), vals[6].tolist())
    assert s.values[0, 1].tolist() == vals[1].tolist()
    assert s.values[1].tolist() == [vals[2].tolist(), vals[5].tolist(), vals[0].tolist()]  # b by event time
    assert s.values[2, 0].tolist() == vals[3].tolist()
    assert s.dt.tolist() == [[0.0, 1.5, 0.0], [0.0, 0.5, 1.5], [0.0, 0.0, 0.0]]
    assert (s.values[~s.mask] == 0).all()


def test_from_columns_empty() -> None:
    with pytest.raises(InputError):
        Sequences.from_columns([], np.zeros(0, np.int64), np.zeros((0, 2), np.float32))


def sinusoids(n_dev: int, n: int, c: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids, ts, vals = [], [], []
    for d in range(n_dev):
        gaps = rng.uniform(0.5, 2.0, size=n)
        t = np.cumsum(gaps)
        period = rng.uniform(8.0, 16.0)
        v = 3.0 + 2.0 * np.sin(2 * np.pi * t[:, None] / period + rng.uniform(0, 6, size=c))
        ids += [f"s{d}"] * n
        ts.append(T0 + np.round(t * 1000).astype(np.int64))
        vals.append(v + 0.05 * rng.standard_normal((n, c)))
    return ids, np.concatenate(ts), np.concatenate(vals).astype(np.float32)


@pytest.mark.parametrize("cell", ["cfc", "liquid"])
def test_rollout_state_matches_operator(cell: str) -> None:
    """Training runs the serving recurrence: same hidden state, statistics, last reading and count."""
    torch.manual_seed(3)
    c = 3
    model = Forecaster(n_channels=c, hidden_size=8, cell=cell, head_units=16)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids, ts, vals = sinusoids(4, 25, c, seed=1)
    keep = np.ones(len(ids), bool)
    keep[[3, 30, 31]] = False  # uneven lengths: exercises padding
    ids = [d for d, k in zip(ids, keep, strict=True) if k]
    ts, vals = ts[keep], vals[keep]
    alpha = 0.05
    seqs = Sequences.from_columns(ids, ts, vals)
    with torch.no_grad():
        _, _, terms, (h, x_last, mean, var, count) = rollout_loss(
            model, seqs.values, seqs.dt, seqs.mask, initial_state(model, len(seqs.device_ids), torch.device("cpu")),
            alpha)
    op = LiquidOperator(model, OperatorSettings(warmup_events=10**6, stats_alpha=alpha))
    op.process(ids, ts, vals)
    rows = op.store.lookup(seqs.device_ids)
    st = op.store.tensors
    for name, got in (("h", h), ("mean", mean), ("var", var), ("x_last", x_last)):
        np.testing.assert_allclose(st[name][rows].numpy(), got.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    assert count.tolist() == op.store.host["count"][rows].tolist() == seqs.mask.sum(1).tolist()
    assert terms.item() == sum(max(0, int(k) - MIN_HISTORY) for k in seqs.mask.sum(1).tolist())


def test_training_reduces_loss_on_sinusoids() -> None:
    torch.manual_seed(0)
    ids, ts, vals = sinusoids(8, 60, 2, seed=2)
    seqs = Sequences.from_columns(ids, ts, vals)
    trainer = Trainer(Forecaster(n_channels=2, hidden_size=12, cell="cfc", head_units=24), lr=1e-2, window=30,
                      batch_devices=8, stats_alpha=0.05, seed=0)
    before = trainer.evaluate(seqs)
    calls: list[tuple[int, int, float]] = []
    history = trainer.fit(seqs, epochs=4, progress=lambda d, t, loss: calls.append((d, t, loss)))
    after = trainer.evaluate(seqs)
    assert len(history) == 4 and all(np.isfinite(history))
    assert [c[0] for c in calls] == list(range(1, 9)) and {c[1] for c in calls} == {8}  # 4 epochs x 2 windows
    assert history[-1] < history[0]
    assert after["nll"] < before["nll"] - 0.1 and after["mse"] < before["mse"]


def test_early_stopping_keeps_the_best_epoch_and_never_learns_from_the_validation_part() -> None:
    ids, ts, vals = sinusoids(8, 80, 2, seed=3)
    seqs = Sequences.from_columns(ids, ts, vals)

    def trained(values: torch.Tensor, epochs: int, patience: int = 2) -> Trainer:
        torch.manual_seed(0)
        trainer = Trainer(Forecaster(n_channels=2, hidden_size=12, cell="cfc", head_units=24), lr=3e-2, window=20,
                          batch_devices=8, stats_alpha=0.05, seed=0)
        trainer.fit(Sequences(seqs.device_ids, values, seqs.dt, seqs.mask), epochs, holdout=0.25,
                    patience=patience)
        return trainer

    long = trained(seqs.values, epochs=12)
    runs, best = long.stopped or (0, 0)
    assert len(long.validation) == runs and 1 <= best <= runs <= 12
    assert long.validation[best - 1] == min(long.validation)
    assert runs == 12 or runs - best == 2, "stops after `patience` epochs without improvement"
    assert long.validation_loss(seqs, seqs.mask & (torch.arange(80) >= 60)) == pytest.approx(min(long.validation))
    # One epoch on data whose last quarter (the validation part) is replaced: the same weights.
    noisy = seqs.values.clone()
    noisy[:, 60:] = 100.0 * torch.randn(noisy[:, 60:].shape)
    a, b = trained(seqs.values, epochs=1), trained(noisy, epochs=1)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    with pytest.raises(InputError):
        a.fit(seqs, 1, holdout=1.0)


def test_train_step_returns_detached_state_and_updates() -> None:
    torch.manual_seed(1)
    model = Forecaster(n_channels=2, hidden_size=6, cell="liquid", head_units=8)
    trainer = Trainer(model, window=16, stats_alpha=0.05)
    seqs = Sequences.from_columns(*sinusoids(3, 32, 2, seed=3))
    state = initial_state(model, 3, torch.device("cpu"))
    params0 = [p.detach().clone() for p in model.parameters()]
    loss1, state = trainer.train_step(seqs.values[:, :16], seqs.dt[:, :16], seqs.mask[:, :16], state)
    assert np.isfinite(loss1)
    assert all(not s.requires_grad and s.grad_fn is None for s in state)
    assert state[4].tolist() == [16.0, 16.0, 16.0]
    assert any(not torch.equal(a, b) for a, b in zip(params0, model.parameters(), strict=True))
    # The carried state feeds the next window (a second step works and backpropagates only through it).
    loss2, state = trainer.train_step(seqs.values[:, 16:], seqs.dt[:, 16:], seqs.mask[:, 16:], state)
    assert np.isfinite(loss2) and state[4].tolist() == [32.0, 32.0, 32.0]
    assert not model.training


def test_train_step_without_terms_changes_nothing() -> None:
    torch.manual_seed(2)
    model = Forecaster(n_channels=2, hidden_size=6, cell="cfc", head_units=8)
    trainer = Trainer(model, window=4)
    seqs = Sequences.from_columns(*sinusoids(2, 4, 2, seed=4))  # fewer readings than MIN_HISTORY
    params0 = [p.detach().clone() for p in model.parameters()]
    loss, _ = trainer.train_step(seqs.values, seqs.dt, seqs.mask, initial_state(model, 2, torch.device("cpu")))
    assert loss == 0.0
    assert all(torch.equal(a, b) for a, b in zip(params0, model.parameters(), strict=True))


def test_evaluate() -> None:
    torch.manual_seed(3)
    trainer = Trainer(Forecaster(n_channels=2, hidden_size=6, cell="ltc", head_units=8), stats_alpha=0.05)
    seqs = Sequences.from_columns(*sinusoids(2, 20, 2, seed=5))
    params0 = [p.detach().clone() for p in trainer.model.parameters()]
    m = trainer.evaluate(seqs)
    assert set(m) == {"nll", "mse"} and all(np.isfinite(v) for v in m.values()) and m["mse"] > 0
    assert trainer.evaluate(seqs) == m, "evaluation is deterministic"
    assert all(torch.equal(a, b) for a, b in zip(params0, trainer.model.parameters(), strict=True))


def _spread_rows(model: Forecaster) -> torch.Tensor:
    last = model.head[-1]
    assert isinstance(last, torch.nn.Linear)
    c = model.n_channels  # rows [C, 2C) of the last layer: the spread (then [2C, 3C): the absolute forecast)
    return torch.cat([last.weight[c:2 * c].detach(), last.bias[c:2 * c, None].detach()], 1)


def test_mean_warmup_trains_the_mean_on_squared_error_then_the_spread() -> None:
    seqs = Sequences.from_columns(*sinusoids(4, 40, 2, seed=6))
    torch.manual_seed(4)
    model = Forecaster(n_channels=2, hidden_size=6, cell="cfc", head_units=8)
    warm = Trainer(model, window=10, lr=1e-2, stats_alpha=0.05, mean_warmup=2)
    before = warm.evaluate(seqs)["mse"]
    warm.fit(seqs, 2)  # warm-up only: squared error, so the spread outputs get no gradient at all
    assert torch.equal(_spread_rows(model), torch.zeros(2, 9))
    assert warm.evaluate(seqs)["mse"] < before
    warm.fit(seqs, 3)  # the third epoch is on the NLL: the spread learns
    assert float(_spread_rows(model).abs().sum()) > 0
    with pytest.raises(InputError):
        Trainer(model, mean_warmup=-1)
    with pytest.raises(InputError):
        Trainer(model, beta=1.5)


def test_beta_nll_weights_each_term_by_its_detached_spread() -> None:
    torch.manual_seed(5)
    model = Forecaster(n_channels=2, hidden_size=6, cell="liquid", head_units=8)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.3 * torch.randn_like(p))  # spreads away from 1, so the weights differ per term
    seqs = Sequences.from_columns(*sinusoids(3, 24, 2, seed=7))
    args = (model, seqs.values, seqs.dt, seqs.mask, initial_state(model, 3, torch.device("cpu")), 0.05)
    nll0, se0, terms0, _ = rollout_loss(*args)
    nll1, se1, terms1, _ = rollout_loss(*args, beta=1.0)
    assert torch.equal(se0, se1) and torch.equal(terms0, terms1) and not torch.isclose(nll0, nll1)
    # beta = 1: the gradient reaching the forecast means is the squared error's / 2, whatever the spread
    head_bias = model.head[-1].bias
    g_beta = torch.autograd.grad(nll1, head_bias)[0][:2]
    g_se = torch.autograd.grad(0.5 * rollout_loss(*args)[1], head_bias)[0][:2]
    assert torch.allclose(g_beta, g_se, rtol=1e-4, atol=1e-6)


def test_absolute_head_trains_jointly_and_evaluation_reports_the_delta_forecast_alone() -> None:
    seqs = Sequences.from_columns(*sinusoids(4, 60, 2, seed=8))
    torch.manual_seed(5)
    model = Forecaster(n_channels=2, hidden_size=6, cell="cfc", head_units=8)
    args = (model, seqs.values, seqs.dt, seqs.mask, initial_state(model, 4, torch.device("cpu")), 0.005)

    def abs_error() -> float:
        with torch.no_grad():
            nll_j, se_j, _, _ = rollout_loss(*args, absolute=True)
            nll, se, _, _ = rollout_loss(*args)
        assert float(nll_j - nll) == pytest.approx(float(se_j - se), rel=1e-4)  # the same term in both sums
        return float(se_j - se)

    before = abs_error()
    assert before > 0
    Trainer(model, window=16, lr=1e-2).fit(seqs, 4)
    assert abs_error() < 0.5 * before, "the absolute head learns from the joint loss"
    with torch.no_grad():
        plain = rollout_loss(*args)
    assert Trainer(model).evaluate(seqs)["nll"] == pytest.approx(float(plain[0] / plain[2]), rel=1e-5)


@pytest.mark.parametrize("cell", ["cfc", "liquid", "ltc"])
def test_time_scale_is_the_models_unit_of_time(cell: str) -> None:
    """A model with a 300 s time unit is the same function of gaps in units of 300 s, on every path the
    operator uses (rows and channels-first), and keeps its unit through save and load."""
    torch.manual_seed(0)
    scaled = Forecaster(n_channels=2, hidden_size=8, cell=cell, time_scale_s=300.0)
    plain = Forecaster(n_channels=2, hidden_size=8, cell=cell)
    plain.load_state_dict(scaled.state_dict())
    h, x = torch.randn(3, 8), torch.randn(3, 2)
    dt = torch.tensor([300.0, 900.0, 30.0])
    with torch.no_grad():
        torch.testing.assert_close(scaled.advance(h, x, dt), plain.advance(h, x, dt / 300))
        for a, b in zip(scaled.forecast_all(h, x, dt), plain.forecast_all(h, x, dt / 300), strict=True):
            torch.testing.assert_close(a, b)
        out_s, out_p = torch.empty(3, 8), torch.empty(3, 8)
        scaled.advance_columns(h, x.t().contiguous(), dt, out_s)
        plain.advance_columns(h, x.t().contiguous(), dt / 300, out_p)
        torch.testing.assert_close(out_s, out_p)
        torch.testing.assert_close(scaled.time_constants(x, h, dt), 300.0 * plain.time_constants(x, h, dt / 300))
    assert Forecaster.from_config(scaled.config()).time_scale_s == 300.0
    assert Forecaster.from_config({"n_channels": 2, "hidden_size": 4}).time_scale_s == 1.0  # older models: seconds
    with pytest.raises(ConfigError):
        Forecaster(n_channels=1, time_scale_s=0.0)


def test_training_sets_the_time_unit_from_its_data() -> None:
    ids, ts, vals = sinusoids(3, 20, 1, seed=4)
    seqs = Sequences.from_columns(ids, ts * 300, vals)  # the same stream sampled 300 times slower
    assert seqs.typical_gap_s() == pytest.approx(300 * Sequences.from_columns(ids, ts, vals).typical_gap_s())
