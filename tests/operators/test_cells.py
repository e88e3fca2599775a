"""Contract suite for the continuous-time cells (``liquidstream.operators.cells``), plus ODE reference checks.

Every contract test runs for each cell (LiquidCell, LTCCell, CfCCell in all three modes) on cpu and, when
available, cuda.  The reference tests integrate each ODE cell's own equation independently with RK4 in
float64 and compare.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liquidstream.operators.cells import CfCCell, ContinuousCell, LiquidCell, LTCCell, build_cell
from liquidstream.operators.errors import ConfigError, InputError

IN, HID, B = 3, 5, 7
ODE_KINDS = ("liquid", "ltc")  # dt = 0 leaves their state bit-for-bit unchanged
SPECS: dict[str, dict[str, Any]] = {
    "liquid": {"kind": "liquid"},
    "ltc": {"kind": "ltc"},
    "cfc-default": {"kind": "cfc", "backbone_units": 16, "mode": "default"},
    "cfc-no_gate": {"kind": "cfc", "backbone_units": 16, "mode": "no_gate"},
    "cfc-pure": {"kind": "cfc", "backbone_units": 16, "mode": "pure"},
}
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


def make(
    name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides: Any
) -> ContinuousCell:
    torch.manual_seed(1234)
    cfg = {**SPECS[name], "input_size": IN, "hidden_size": HID, **overrides}
    return build_cell(**cfg).to(device=device, dtype=dtype).eval()


def batch(
    cell: ContinuousCell, n: int = B, *, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(cell.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cell.input_size, generator=g, dtype=torch.float64)
    h = torch.randn(n, cell.hidden_size, generator=g, dtype=torch.float64) * 0.5
    return x.to(p.device, dtype or p.dtype), h.to(p.device, dtype or p.dtype)


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    # (torch.testing.assert_close costs seconds of lazy imports on first use.)
    err = ((a - b).abs() - rtol * b.abs()).max().item() if a.numel() else 0.0
    assert a.shape == b.shape and err <= atol, f"not close: max(|a - b| - rtol |b|) = {err:.3g} > {atol}"


def rowwise(cell: ContinuousCell, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    return torch.cat([cell(x[i : i + 1], h[i : i + 1], dt[i : i + 1]) for i in range(x.shape[0])])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(SPECS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cell(name: str, device: str) -> ContinuousCell:
    return make(name, device)


# --------------------------------------------------------------------------------------------- contract


@torch.no_grad()
def test_batch_equals_row_by_row_with_a_dt_per_row(cell: ContinuousCell) -> None:
    x, h = batch(cell)
    dt = torch.tensor([0.0, 1e-3, 0.05, 0.7, 3.0, 42.0, 1e4], device=x.device)
    out = cell(x, h, dt)
    assert out.shape == (B, HID)
    assert (out - rowwise(cell, x, h, dt)).abs().max().item() <= 1e-5
    # The dt really is per row: giving every row row 3's dt changes the other rows.
    same = cell(x, h, dt[3].expand(B).contiguous())
    assert torch.allclose(same[3], out[3], atol=1e-6)
    assert not torch.allclose(same, out, atol=1e-4)


@torch.no_grad()
def test_dt_zero(cell: ContinuousCell, name: str) -> None:
    x, h = batch(cell)
    out = cell(x, h, torch.zeros(B, device=x.device))
    assert torch.isfinite(out).all()
    if SPECS[name]["kind"] in ODE_KINDS:
        assert torch.equal(out, h)


@torch.no_grad()
def test_huge_dt_stays_finite(cell: ContinuousCell, name: str) -> None:
    x, h = batch(cell)
    dt = torch.tensor([1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6], device=x.device)
    out = cell(x, h, dt)
    assert torch.isfinite(out).all()
    if isinstance(cell, LiquidCell):  # dt >> tau: the state is the target itself
        assert_close(out[-1], cell.target(x, h)[-1])
    if isinstance(cell, LTCCell):  # each sub-step is a convex combination of v, vleak and the reversals
        p = cell.effective_parameters()
        bounds = torch.cat([h.flatten()] + [p[k].flatten() for k in ("vleak", "erev", "sensory_erev")])
        lo, hi = bounds.min().item(), bounds.max().item()
        assert lo - 1e-5 <= out.min().item() and out.max().item() <= hi + 1e-5


@torch.no_grad()
def test_negative_dt_is_treated_as_zero(cell: ContinuousCell) -> None:
    x, h = batch(cell)
    neg = torch.tensor([-1e-9, -0.5, -1.0, -3.0, -60.0, -1e6, -0.0], device=x.device)
    assert torch.equal(cell(x, h, neg), cell(x, h, torch.zeros(B, device=x.device)))


@torch.no_grad()
def test_deterministic(cell: ContinuousCell) -> None:
    x, h = batch(cell)
    dt = torch.linspace(0.0, 5.0, B, device=x.device)
    assert torch.equal(cell(x, h, dt), cell(x, h, dt))
    assert torch.equal(cell.time_constants(x, h), cell.time_constants(x, h))


def test_inputs_are_not_mutated(cell: ContinuousCell) -> None:
    x, h = batch(cell)
    dt = torch.tensor([-1.0, 0.0, 0.1, 1.0, 2.0, 1e3, 1e6], device=x.device)
    before = [t.clone() for t in (x, h, dt)]
    out = cell(x, h, dt)
    out.sum().backward()  # backward must not write into the inputs either
    cell.time_constants(x, h)
    for t, b in zip((x, h, dt), before, strict=True):
        assert torch.equal(t, b)


def test_gradcheck_float64(name: str, device: str) -> None:
    small = make(name, device, torch.float64, input_size=2, hidden_size=3, **_small(name))
    g = torch.Generator().manual_seed(7)
    kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
    x = torch.randn(3, 2, generator=g).to(**kw).requires_grad_()
    h = (0.5 * torch.randn(3, 3, generator=g)).to(**kw).requires_grad_()
    dt = torch.tensor([0.05, 0.4, 2.0], **kw).requires_grad_()  # > 0: clamp(min=0) is smooth there
    assert torch.autograd.gradcheck(small, (x, h, dt), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradcheck(small.time_constants, (x, h), eps=1e-6, atol=1e-6, rtol=1e-4)


def _small(name: str) -> dict[str, Any]:
    return {"backbone_units": 4} if SPECS[name]["kind"] == "cfc" else {}


BAD_SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "x wrong width": ((B, IN + 1), (B, HID), (B,)),
    "x 1-d": ((IN,), (B, HID), (B,)),
    "x 3-d": ((B, IN, 1), (B, HID), (B,)),
    "h wrong width": ((B, IN), (B, HID - 1), (B,)),
    "h 1-d": ((B, IN), (HID,), (B,)),
    "batch mismatch": ((B, IN), (B - 1, HID), (B,)),
    "dt [B, 1]": ((B, IN), (B, HID), (B, 1)),
    "dt [B, HID]": ((B, IN), (B, HID), (B, HID)),
    "dt too short": ((B, IN), (B, HID), (B - 1,)),
    "dt scalar": ((B, IN), (B, HID), ()),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_bad_shapes_raise_input_error(cell: ContinuousCell, case: str) -> None:
    xs, hs, ds = BAD_SHAPES[case]
    dev = next(cell.parameters()).device
    with pytest.raises(InputError):
        cell(torch.zeros(xs, device=dev), torch.zeros(hs, device=dev), torch.zeros(ds, device=dev))
    if case.startswith(("x", "h", "batch")):
        with pytest.raises(InputError):
            cell.time_constants(torch.zeros(xs, device=dev), torch.zeros(hs, device=dev))


def test_bad_dtypes_raise_input_error(cell: ContinuousCell) -> None:
    x, h = batch(cell)
    dt = torch.ones(B, device=x.device)
    with pytest.raises(InputError, match="dt must be floating"):
        cell(x, h, torch.ones(B, dtype=torch.int64, device=x.device))
    with pytest.raises(InputError, match="floating point"):
        cell(x.long(), h, dt)
    with pytest.raises(InputError, match="share a dtype"):
        cell(x.double(), h, dt)
    with pytest.raises(InputError, match="torch.Tensor"):
        cell(x, h, 1.0)
    # A float64 dt (e.g. from timestamps) is accepted and cast to the state's dtype.
    with torch.no_grad():
        assert torch.equal(cell(x, h, dt.double()), cell(x, h, dt))


@torch.no_grad()
def test_empty_batch(cell: ContinuousCell) -> None:
    x, h = batch(cell, 0)
    assert cell(x, h, torch.zeros(0, device=x.device)).shape == (0, HID)
    assert cell.time_constants(x, h).shape == (0, HID)


def test_config_round_trip(name: str, device: str) -> None:
    cell = make(name, device)
    cfg = cell.config()
    assert cfg["kind"] == SPECS[name]["kind"]
    again = build_cell(**json.loads(json.dumps(cfg))).to(device).eval()
    assert type(again) is type(cell) and again.config() == cfg
    shapes = {k: v.shape for k, v in cell.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    again.load_state_dict(cell.state_dict())
    x, h = batch(cell)
    dt = torch.linspace(0.0, 3.0, B, device=device)
    with torch.no_grad():
        assert torch.equal(again(x, h, dt), cell(x, h, dt))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (LiquidCell, {"tau_min": 0.5, "tau_init_min": 2.0, "tau_init_max": 3.0}),
        (LTCCell, {"ode_unfolds": 4, "epsilon": 1e-6, "input_mapping": "linear"}),
        (CfCCell, {"backbone_units": 8, "backbone_layers": 2, "mode": "no_gate", "backbone_dropout": 0.1}),
        (CfCCell, {"backbone_layers": 0, "mode": "pure", "backbone_activation": "silu"}),
    ],
)
def test_config_keeps_hyperparameters_as_given(cls: type[ContinuousCell], kwargs: dict[str, Any]) -> None:
    cfg: dict[str, Any] = cls(IN, HID, **kwargs).config()
    assert set(cfg) == {"kind"} | set(inspect.signature(cls).parameters)
    assert cfg == {**cfg, "input_size": IN, "hidden_size": HID, **kwargs}
    assert build_cell(**cfg).config() == cfg


@pytest.mark.parametrize(
    ("kind", "kwargs", "match"),
    [
        ("gru", {}, "unknown cell kind"),
        ("ltc", {"bogus": 1}, "unknown config keys"),
        ("ltc", {"input_size": None}, "missing config keys"),
        ("liquid", {"hidden_size": 0}, "hidden_size"),
        ("liquid", {"tau_min": 0.0}, "tau_min"),
        ("liquid", {"tau_init_min": 20.0}, "tau_init"),
        ("ltc", {"ode_unfolds": 0}, "ode_unfolds"),
        ("ltc", {"epsilon": -1.0}, "epsilon"),
        ("ltc", {"input_mapping": "quadratic"}, "input_mapping"),
        ("cfc", {"mode": "fancy"}, "mode"),
        ("cfc", {"backbone_activation": "relu"}, "backbone_activation"),
        ("cfc", {"backbone_units": 0}, "backbone_units"),
        ("cfc", {"backbone_layers": -1}, "backbone_layers"),
        ("cfc", {"backbone_dropout": 1.0}, "backbone_dropout"),
    ],
)
def test_bad_config_raises_config_error(kind: str, kwargs: dict[str, Any], match: str) -> None:
    cfg = {"input_size": IN, "hidden_size": HID, **kwargs}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        build_cell(kind, **cfg)


@torch.no_grad()
def test_time_constants_shape_and_positivity(cell: ContinuousCell) -> None:
    x, h = batch(cell)
    tau = cell.time_constants(x, h)
    assert tau.shape == (B, HID)
    assert torch.isfinite(tau).all() and (tau > 0).all()
    for i in range(B):  # row-wise too
        one = cell.time_constants(x[i : i + 1], h[i : i + 1])
        assert_close(one, tau[i : i + 1], rtol=1e-4)  # CfC's 1/|time_a| amplifies ulp differences


def test_liquid_time_constants_start_spread_over_1_to_10_s() -> None:
    tau = make("liquid").time_constants(*batch(make("liquid")))
    assert_close(tau[:, 0], torch.full((B,), 1.0))
    assert_close(tau[:, -1], torch.full((B,), 10.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(list(SPECS)),
    dts=st.lists(
        st.one_of(
            st.sampled_from([0.0, -0.0, -1.0, 1e-12, 1e-6, 1e5, 1e6]),
            st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
        ),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**16),
)
def test_property_random_dt_vectors_finite_and_row_equal(name: str, dts: list[float], seed: int) -> None:
    cell = cached(name)
    x, h = batch(cell, len(dts), seed=seed)
    dt = torch.tensor(dts)
    with torch.no_grad():
        out = cell(x, h, dt)
        assert torch.isfinite(out).all()
        assert (out - rowwise(cell, x, h, dt)).abs().max().item() <= 1e-5
        if SPECS[name]["kind"] in ODE_KINDS:
            zero = dt <= 0
            assert torch.equal(out[zero], h[zero])


@functools.cache
def cached(name: str) -> ContinuousCell:
    return make(name)


# ------------------------------------------------------------------------------ ODE reference checks


def rk4(f: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, dt: torch.Tensor, n: int) -> torch.Tensor:
    """Classic RK4 with ``n`` steps of ``dt[i] / n`` for row ``i``."""
    s = (dt / n)[:, None]
    for _ in range(n):
        k1 = f(v)
        k2 = f(v + s / 2 * k1)
        k3 = f(v + s / 2 * k2)
        k4 = f(v + s * k3)
        v = v + s / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return v


def ltc_rhs(cell: LTCCell, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``dv/dt = [gleak (vleak - v) + sum_j w_j s_j (erev_j - v)] / cm``, written out synapse by synapse."""
    p = {k: t.detach() for k, t in cell.effective_parameters().items()}
    pre_in = cell.map_input(x).detach()  # [B, in]
    s_in = torch.sigmoid(p["sensory_sigma"] * (pre_in[:, :, None] - p["sensory_mu"]))  # [B, in, post]

    def rhs(v: torch.Tensor) -> torch.Tensor:
        sensory = (p["sensory_w"] * s_in * (p["sensory_erev"] - v[:, None, :])).sum(1)
        s_rec = torch.sigmoid(p["sigma"] * (v[:, :, None] - p["mu"]))  # [B, pre, post]
        recurrent = (p["w"] * s_rec * (p["erev"] - v[:, None, :])).sum(1)
        return (p["gleak"] * (p["vleak"] - v) + sensory + recurrent) / p["cm"]

    return rhs


def test_ltc_matches_fine_rk4_reference() -> None:
    fine = make("ltc", dtype=torch.float64, ode_unfolds=2000)
    assert isinstance(fine, LTCCell)
    x, h = batch(fine, 4)
    dt = torch.tensor([0.01, 0.05, 0.2, 1.0], dtype=torch.float64)  # time constants here: ~0.2-0.8 s
    ref = rk4(ltc_rhs(fine, x), h, dt, 100)
    assert (ref - rk4(ltc_rhs(fine, x), h, dt, 200)).abs().max().item() < 1e-8  # RK4 has converged
    moved = (ref - h).abs().amax(1, keepdim=True)  # how far each row travels: the error's scale
    errors = {}
    for unfolds in (6, 500, 2000):
        cell = make("ltc", dtype=torch.float64, ode_unfolds=unfolds)
        with torch.no_grad():
            errors[unfolds] = ((cell(x, h, dt) - ref).abs() / moved).max().item()
    assert errors[2000] < 1e-3  # measured ~6e-4 (at dt = 1 s, about 2 to 5 time constants)
    assert errors[6] < 0.25  # measured ~0.17: six semi-implicit sub-steps of up to 1/6 s
    ratio = errors[500] / errors[2000]  # first-order solver: error ~ dt / ode_unfolds
    assert 3.0 < ratio < 5.0


def test_liquid_closed_form_for_constant_target() -> None:
    cell = make("liquid", dtype=torch.float64)
    assert isinstance(cell, LiquidCell)
    with torch.no_grad():
        cell.recurrent.weight.zero_()  # U = 0: the target f = tanh(W x + b) is constant
        x, h = batch(cell)
        dt = torch.tensor([0.0, 1e-4, 0.3, 1.0, 5.0, 30.0, 1e3], dtype=torch.float64)
        f = torch.tanh(cell.input_map(x))
        exact = f + (h - f) * torch.exp(-dt[:, None] / cell.tau())
        assert_close(cell(x, h, dt), exact, rtol=1e-12, atol=1e-12)
        half = cell(x, cell(x, h, dt / 2), dt / 2)  # exact integration composes
        assert_close(half, cell(x, h, dt), rtol=1e-12, atol=1e-12)


def test_liquid_small_steps_match_rk4_reference() -> None:
    cell = make("liquid", dtype=torch.float64)
    assert isinstance(cell, LiquidCell)
    with torch.no_grad():
        x, h = batch(cell, 4)
        dt = torch.tensor([0.5, 2.0, 5.0, 20.0], dtype=torch.float64)
        ref = rk4(lambda v: (-v + cell.target(x, v)) / cell.tau(), h, dt, 100)
        v, n = h, 1000
        for _ in range(n):
            v = cell(x, v, dt / n)
        moved = (ref - h).abs().amax(1, keepdim=True)
        assert ((v - ref).abs() / moved).max().item() < 1e-3


@pytest.mark.parametrize("kwargs", [{}, {"backbone_activation": "silu"}, {"backbone_layers": 2},
                                    {"backbone_layers": 0}, {"backbone_dropout": 0.3}])
def test_cfc_serving_path_matches_autograd_path(kwargs: dict[str, Any], device: str) -> None:
    """``CfCCell`` serves (eval, no autograd) through a fused path; it must compute the same function."""
    torch.manual_seed(3)
    cell = CfCCell(input_size=3, hidden_size=5, backbone_units=7, **kwargs).to(device).eval()
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the init's symmetries
    x, h = torch.randn(9, 3, device=device), torch.randn(9, 5, device=device)
    dt = torch.tensor([0.0, 1e-3, 0.1, 0.5, 1.0, 3.0, 60.0, 1e4, -1.0], device=device)
    with torch.enable_grad():
        reference = cell(x, h, dt)  # autograd enabled: the plain formula
    assert reference.requires_grad
    with torch.no_grad():
        served = cell(x, h, dt)
    assert not served.requires_grad
    assert_close(served, reference.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"backbone_activation": "silu"}, {"backbone_layers": 2},
                                    {"backbone_dropout": 0.3}])
def test_cfc_column_serving_matches_autograd_path(kwargs: dict[str, Any], device: str) -> None:
    """The step operator's layout (features first in, rows with a row stride out) computes the same function,
    and follows an in-place change of the weights (its derived weights are cached)."""
    torch.manual_seed(4)
    cell = CfCCell(input_size=3, hidden_size=5, backbone_units=7, **kwargs).to(device).eval()
    assert cell.serves_columns()
    x, dt = torch.randn(9, 3, device=device), torch.tensor([0.0, 1e-3, 0.1, 0.5, 1.0, 3.0, 60.0, 1e4, -1.0],
                                                           device=device)
    rows = torch.randn(9, 12, device=device)  # h is a column view with a row stride, as in the state store
    x_cols = torch.cat([x.t(), torch.ones(1, 9, device=device)])  # features first, plus the bias row
    for _ in range(2):
        with torch.no_grad():
            for p in cell.parameters():
                p.add_(0.3 * torch.randn_like(p))  # in place: the second round must see the new weights
        with torch.enable_grad():
            reference = cell(x, rows[:, 2:7], dt).detach()
        out = torch.full((9, 12), float("nan"), device=device)
        with torch.no_grad():
            served = cell.serve_columns(x_cols, rows[:, 2:7], dt, out[:, 4:9])
        assert_close(served, reference, rtol=1e-5, atol=1e-6)
        assert_close(out[:, 4:9], reference, rtol=1e-5, atol=1e-6)
        assert torch.isnan(out[:, :4]).all() and torch.isnan(out[:, 9:]).all()  # nothing written outside out
