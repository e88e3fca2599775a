"""Event-time planning (``liquidstream.operators.waves.plan_waves``) and the event policies as the operator applies
them.

``plan_waves`` is checked against a per-event reference written from the policy definitions (sequential
per device in event-time order; the device clock is the max applied event time and never moves backwards),
then the policies are checked end to end through :class:`LiquidOperator` and its state store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.normalization import normalise
from liquidstream.operators.result import EventStatus as S
from liquidstream.operators.waves import plan_waves
from tests.operators.conftest import BOTH_PATHS

T0 = 1_700_000_000_000  # epoch ms
C = 2




def reference_plan(rows: list[int], ts: list[int], last: list[int], count: list[int],
                   s: OperatorSettings) -> dict[str, Any]:
    """Per-event oracle: status, long_gap, and for applied events (dt, reset, count_before, rank)."""
    n = len(rows)
    status: list[S | None] = [None] * n
    long_gap = [False] * n
    applied: dict[int, tuple[float, bool, int, int]] = {}
    for r in sorted(set(rows)):
        clock = last[r] if count[r] > 0 else None
        c = count[r]
        rank = 0
        for i in sorted((i for i in range(n) if rows[i] == r), key=lambda i: (ts[i], i)):
            t = ts[i]
            if clock is None:
                status[i], dt = S.FIRST, 0.0
            elif t < clock:
                status[i], dt = (S.LATE_DROPPED if s.late_policy == "drop" else S.LATE_ACCEPTED), 0.0
            elif t == clock:
                status[i], dt = (S.DUPLICATE_DROPPED if s.duplicate_policy == "drop" else S.DUPLICATE_ACCEPTED), 0.0
            else:
                status[i], dt = S.OK, (t - clock) / 1000.0
            if status[i] in (S.LATE_DROPPED, S.DUPLICATE_DROPPED):
                continue
            long_gap[i] = dt > s.max_gap_s
            if s.gap_policy == "clamp":
                dt = min(dt, s.max_gap_s)
            applied[i] = (dt, long_gap[i] and s.gap_policy == "reset", c, rank)
            c, rank = c + 1, rank + 1
            clock = t if clock is None else max(clock, t)
    return {"status": status, "long_gap": long_gap, "applied": applied}


def check_plan(rows: list[int], ts: list[int], last: list[int], count: list[int], s: OperatorSettings) -> None:
    ref = reference_plan(rows, ts, last, count, s)
    rows_a, ts_a = np.array(rows, np.int64), np.array(ts, np.int64)
    last_a, count_a = np.array(last, np.int64), np.array(count, np.int32)
    before = (rows_a.copy(), ts_a.copy(), last_a.copy(), count_a.copy())
    plan = plan_waves(rows_a, ts_a, last_a, count_a, s)
    for a, b in zip((rows_a, ts_a, last_a, count_a), before, strict=True):
        assert np.array_equal(a, b), "plan_waves must not modify its inputs"
    assert [S(x) for x in plan.status] == ref["status"]
    assert plan.long_gap.tolist() == ref["long_gap"]
    applied = ref["applied"]
    assert sorted(plan.source.tolist()) == sorted(applied), "source = exactly the applied events"
    for j, i in enumerate(plan.source.tolist()):
        dt, reset, cb, _ = applied[i]
        assert plan.rows[j] == rows[i]
        assert plan.dt_s[j] == pytest.approx(dt, rel=1e-6, abs=1e-9)
        assert bool(plan.reset[j]) == reset and plan.count_before[j] == cb
    # Waves: wave k = the k-th applied event of every device (distinct rows, event-time order per device).
    bounds = plan.bounds.tolist()
    per_device = [sum(1 for i in applied if rows[i] == r) for r in set(rows)]
    assert plan.n_waves == (max(per_device) if applied else 0)
    assert bounds[0] == 0 and bounds[-1] == len(applied) and bounds == sorted(bounds)
    for k in range(plan.n_waves):
        wave = plan.source[bounds[k]:bounds[k + 1]].tolist()
        assert wave, f"wave {k} empty"
        assert len({rows[i] for i in wave}) == len(wave), f"wave {k} repeats a device"
        assert all(applied[i][3] == k for i in wave)


# ------------------------------------------------------------------------------------------------ plan_waves
def test_plan_example_by_hand() -> None:
    # row 0 known (clock 5000, 3 readings), row 1 new.
    rows = [0, 1, 0, 0, 1, 0, 0]
    ts = [7000, 1000, 4000, 5000, 1000, 6000, 6000]
    plan = plan_waves(np.array(rows), np.array(ts), np.array([5000, 0]), np.array([3, 0], np.int32),
                      OperatorSettings())
    assert [S(x).label for x in plan.status] == ["ok", "first", "late_dropped", "duplicate_dropped",
                                                 "duplicate_dropped", "ok", "duplicate_dropped"]
    # Row 0 applies 6000 (dt 1 s) then 7000 (dt 1 s), row 1 applies its first event.
    assert plan.n_waves == 2
    assert plan.source[plan.bounds[0]:plan.bounds[1]].tolist() in ([5, 1], [1, 5])
    assert plan.source[plan.bounds[1]:].tolist() == [0]
    by_src = dict(zip(plan.source.tolist(), plan.dt_s.tolist(), strict=True))
    assert by_src == {5: 1.0, 1: 0.0, 0: 1.0}
    assert dict(zip(plan.source.tolist(), plan.count_before.tolist(), strict=True)) == {5: 3, 1: 0, 0: 4}
    check_plan(rows, ts, [5000, 0], [3, 0], OperatorSettings())


def test_plan_accept_policies_use_dt_zero_and_keep_clock() -> None:
    s = OperatorSettings(duplicate_policy="accept", late_policy="accept")
    # Known device, clock 5000: a late 2000 (accepted, dt 0), a duplicate 5000 (dt 0), then 8000 (dt 3 s from the
    # clock 5000, not from the late 2000).
    plan = plan_waves(np.array([0, 0, 0]), np.array([8000, 5000, 2000]), np.array([5000]),
                      np.array([1], np.int32), s)
    assert [S(x) for x in plan.status] == [S.OK, S.DUPLICATE_ACCEPTED, S.LATE_ACCEPTED]
    assert plan.source.tolist() == [2, 1, 0] and plan.dt_s.tolist() == [0.0, 0.0, 3.0]
    assert plan.n_waves == 3


@pytest.mark.parametrize("policy", ["decay", "reset", "clamp"])
def test_plan_long_gap_boundary(policy: str) -> None:
    s = OperatorSettings(gap_policy=policy, max_gap_s=10.0)  # type: ignore[arg-type]
    plan = plan_waves(np.array([0, 1]), np.array([20_000, 20_001]), np.array([10_000, 10_000]),
                      np.array([1, 1], np.int32), s)
    assert plan.long_gap.tolist() == [False, True]  # exactly max_gap_s is not long
    dts = dict(zip(plan.rows.tolist(), plan.dt_s.tolist(), strict=True))
    assert dts[0] == 10.0
    assert dts[1] == pytest.approx(10.0 if policy == "clamp" else 10.001)
    assert dict(zip(plan.rows.tolist(), plan.reset.tolist(), strict=True)) == {0: False, 1: policy == "reset"}


def test_plan_empty_batch() -> None:
    plan = plan_waves(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(2, np.int64),
                      np.zeros(2, np.int32), OperatorSettings())
    assert plan.n_waves == 0 and plan.source.size == 0 and plan.status.size == 0


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], list[int], OperatorSettings]:
    n_rows = draw(st.integers(1, 5))
    n = draw(st.integers(0, 30))
    rows = draw(st.lists(st.integers(0, n_rows - 1), min_size=n, max_size=n))
    ts = draw(st.lists(st.integers(0, 16).map(lambda k: T0 + 500 * k), min_size=n, max_size=n))
    count = draw(st.lists(st.sampled_from([0, 0, 1, 7]), min_size=n_rows, max_size=n_rows))
    last = [draw(st.integers(0, 16)) * 500 + T0 if c else 0 for c in count]
    s = OperatorSettings(duplicate_policy=draw(st.sampled_from(["drop", "accept"])),
                         late_policy=draw(st.sampled_from(["drop", "accept"])),
                         gap_policy=draw(st.sampled_from(["decay", "reset", "clamp"])),
                         max_gap_s=draw(st.sampled_from([0.4, 1.5, 3.0, 100.0])))
    return rows, ts, last, count, s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_plan_matches_reference(batch: tuple[list[int], list[int], list[int], list[int], OperatorSettings]) -> None:
    check_plan(*batch)


# ------------------------------------------------------------------------------------------------ operator
def make_op(cell: str = "liquid", **kw: Any) -> LiquidOperator:
    torch.manual_seed(0)
    kw.setdefault("warmup_events", 10**6)  # these tests check state, not alerts: statistics always learn
    return LiquidOperator(Forecaster(n_channels=C, hidden_size=6, cell=cell, head_units=8), OperatorSettings(**kw))


def warm(op: LiquidOperator, dev: str = "d", n: int = 6, gap_ms: int = 1000) -> int:
    """Feed n readings at a regular gap; returns the last event time."""
    ts = T0 + gap_ms * np.arange(n)
    vals = np.stack([np.sin(np.arange(n) * 0.7), np.cos(np.arange(n) * 0.3)], axis=1).astype(np.float32)
    res = op.process([dev] * n, ts, vals)
    assert res.applied.all()
    return int(ts[-1])


def state(op: LiquidOperator, dev: str = "d") -> dict[str, np.ndarray]:
    r = int(op.store.lookup([dev])[0])
    return {k: v[r].cpu().numpy().copy() for k, v in op.store.tensors.items()} | {
        k: np.array(v[r]) for k, v in op.store.host.items()}


@BOTH_PATHS
def test_first_event_status_and_outputs() -> None:
    op = make_op()
    res = op.process(["a", "b"], np.array([T0, T0]), np.array([[1, 2], [3, 4]], np.float32))
    assert res.status.tolist() == [S.FIRST, S.FIRST]
    assert np.isnan(res.score).all() and np.isfinite(res.forecast).all() and not res.is_alert.any()
    assert op.store.host["count"][op.store.lookup(["a", "b"])].tolist() == [1, 1]
    res2 = op.process(["a"], np.array([T0 + 1000]), np.array([[1, 2]], np.float32))
    assert res2.status.tolist() == [S.OK] and np.isfinite(res2.score).all()


@BOTH_PATHS
@pytest.mark.parametrize("policy", ["drop", "accept"])
def test_duplicate_policy(policy: str) -> None:
    op = make_op(duplicate_policy=policy)
    last = warm(op)
    before = state(op)
    res = op.process(["d"], np.array([last]), np.array([[5.0, -5.0]], np.float32))
    after = state(op)
    assert int(after["last_ts_ms"]) == last
    if policy == "drop":
        assert res.status.tolist() == [S.DUPLICATE_DROPPED] and not res.applied[0]
        assert np.isnan(res.forecast).all() and np.isnan(res.score).all() and not res.is_alert[0]
        for k in before:
            assert np.array_equal(before[k], after[k]), f"dropped duplicate changed {k}"
    else:
        assert res.status.tolist() == [S.DUPLICATE_ACCEPTED] and np.isfinite(res.forecast).all()
        assert int(after["count"]) == int(before["count"]) + 1
        assert after["x_last"].tolist() == [5.0, -5.0]
        # dt = 0: the liquid cell leaves the hidden state bit-for-bit unchanged.
        assert np.array_equal(after["h"], before["h"])


@BOTH_PATHS
@pytest.mark.parametrize("policy", ["drop", "accept"])
def test_late_policy_clock_never_moves_back(policy: str) -> None:
    op = make_op(late_policy=policy)
    last = warm(op)
    before = state(op)
    res = op.process(["d"], np.array([last - 2500]), np.array([[0.5, 0.5]], np.float32))
    after = state(op)
    assert int(after["last_ts_ms"]) == last, "the device clock moved backwards"
    if policy == "drop":
        assert res.status.tolist() == [S.LATE_DROPPED] and np.isnan(res.score).all()
        for k in before:
            assert np.array_equal(before[k], after[k]), f"dropped late event changed {k}"
    else:
        assert res.status.tolist() == [S.LATE_ACCEPTED] and np.isfinite(res.score).all()
        assert int(after["count"]) == int(before["count"]) + 1
        assert np.array_equal(after["h"], before["h"]), "accepted late event must use dt = 0"
        assert not np.array_equal(after["x_last"], before["x_last"])
    # The next reading's gap is measured from the clock (last), not from the late event.
    h_before = torch.as_tensor(after["h"]).unsqueeze(0)
    x = np.array([[0.1, 0.2]], np.float32)
    op.process(["d"], np.array([last + 1000]), x)
    s2 = state(op)
    want = op.model.advance(h_before, normalise(torch.as_tensor(x), torch.as_tensor(s2["mean"])[None],
                                                torch.as_tensor(s2["var"])[None]), torch.tensor([1.0]))
    np.testing.assert_allclose(s2["h"], want[0].detach().numpy(), rtol=1e-5, atol=1e-6)


@BOTH_PATHS
@pytest.mark.parametrize("policy", ["decay", "reset", "clamp"])
@pytest.mark.parametrize("cell", ["liquid", "cfc"])
def test_long_gap_policies_on_hidden_state(policy: str, cell: str) -> None:
    max_gap = 30.0
    op = make_op(cell=cell, gap_policy=policy, max_gap_s=max_gap)
    last = warm(op)
    h_before = torch.as_tensor(state(op)["h"]).unsqueeze(0)
    assert h_before.abs().sum() > 0
    gap_s = 500.0
    x = np.array([[0.3, -0.4]], np.float32)
    res = op.process(["d"], np.array([last + int(gap_s * 1000)]), x)
    assert res.long_gap.tolist() == [True] and res.status.tolist() == [S.OK]
    s = state(op)
    x_n = normalise(torch.as_tensor(x), torch.as_tensor(s["mean"])[None], torch.as_tensor(s["var"])[None])
    h0 = {"decay": h_before, "reset": torch.zeros_like(h_before), "clamp": h_before}[policy]
    dt = {"decay": gap_s, "reset": gap_s, "clamp": max_gap}[policy]
    want = op.model.advance(h0, x_n, torch.tensor([dt]))[0].detach().numpy()
    np.testing.assert_allclose(s["h"], want, rtol=1e-5, atol=1e-6)
    other_h0 = torch.zeros_like(h_before) if policy != "reset" else h_before
    other = op.model.advance(other_h0, x_n, torch.tensor([dt]))[0].detach().numpy()
    if cell == "cfc":  # (a liquid cell forgets everything after 500 s anyway)
        assert not np.allclose(want, other, atol=1e-4), "reset vs keep must make a difference here"
    assert int(s["last_ts_ms"]) == last + int(gap_s * 1000)


@BOTH_PATHS
def test_clamp_equals_decay_over_max_gap() -> None:
    """gap_policy="clamp" after a long gap leaves the device exactly where a gap of max_gap_s would."""
    max_gap = 20.0
    clamp, decay = make_op(cell="cfc", gap_policy="clamp", max_gap_s=max_gap), make_op(
        cell="cfc", gap_policy="decay", max_gap_s=max_gap)
    last = warm(clamp)
    assert warm(decay) == last
    x = np.array([[1.0, 0.0]], np.float32)
    rc = clamp.process(["d"], np.array([last + 3_600_000]), x)
    rd = decay.process(["d"], np.array([last + int(max_gap * 1000)]), x)
    assert rc.long_gap.tolist() == [True] and rd.long_gap.tolist() == [False]
    np.testing.assert_allclose(rc.forecast, rd.forecast, rtol=1e-6)
    np.testing.assert_allclose(rc.score, rd.score, rtol=1e-6)
    sc, sd = state(clamp), state(decay)
    for k in sc:
        if k != "last_ts_ms":
            np.testing.assert_allclose(sc[k], sd[k], rtol=1e-6, err_msg=k)


@BOTH_PATHS
def test_out_of_order_batch_equals_in_order_stream() -> None:
    """A shuffled batch gives, row for row, what the events give one at a time in event-time order."""
    rng = np.random.default_rng(5)
    ids, ts, vals = [], [], []
    for d in range(4):
        t = T0 + np.cumsum(rng.integers(200, 4000, size=12))
        ids += [f"d{d}"] * 12
        ts.append(t)
        vals.append(rng.standard_normal((12, C)))
    ts_a, vals_a = np.concatenate(ts), np.concatenate(vals).astype(np.float32)
    perm = rng.permutation(len(ids))
    shuffled = make_op(cell="cfc").process([ids[i] for i in perm], ts_a[perm], vals_a[perm])
    seq_op = make_op(cell="cfc")
    in_order = np.argsort(ts_a, kind="stable")
    expect: dict[int, tuple[Any, ...]] = {}
    for i in in_order:
        r = seq_op.process([ids[i]], ts_a[i:i + 1], vals_a[i:i + 1])
        expect[int(i)] = (r.status[0], r.forecast[0], r.score[0])
    for j, i in enumerate(perm.tolist()):
        st_, f, sc = expect[i]
        assert shuffled.status[j] == st_
        np.testing.assert_allclose(shuffled.forecast[j], f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(shuffled.score[j], sc, rtol=1e-5, atol=1e-5, equal_nan=True)


@BOTH_PATHS
@pytest.mark.parametrize("scale", [1, 70_000])
def test_row_time_order_matches_lexsort(scale: int) -> None:
    """The radix fast path (rows beyond 16 bits included) and its fallback give the lexsort's order."""
    from liquidstream.operators.waves import _by_row_then_time

    rng = np.random.default_rng(5)
    rows = rng.integers(0, 300, 2000) * scale
    in_order = np.sort(rng.integers(0, 10**6, 2000))  # arrival order = event-time order
    shuffled = rng.integers(0, 10**6, 2000)
    for ts in (in_order, shuffled, np.zeros(2000, np.int64)):
        np.testing.assert_array_equal(_by_row_then_time(rows, ts), np.lexsort((np.arange(2000), ts, rows)))
