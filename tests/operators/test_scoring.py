"""Scoring and the alert state machine: AnomalyScorer alone (against a reference machine), then through the
operator (spikes, warm-up, frozen statistics during alerts, stuck sensors, cooldown, max duration)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liquidstream.operators import AnomalyScorer, Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.errors import ConfigError
from liquidstream.operators.scoring import AlertState

T0 = 1_700_000_000_000
C = 4




# ------------------------------------------------------------------------------------------------ scorer
def test_score_is_max_standardised_residual() -> None:
    scorer = AnomalyScorer(OperatorSettings())
    x = torch.tensor([[1.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
    mu = torch.tensor([[0.0, 0.0, 0.0], [1.0, -4.0, 0.5]])
    sd = torch.tensor([[1.0, 4.0, 2.0], [0.5, 2.0, 1.0]])
    score, z = scorer.score(x, mu, sd)
    assert z.tolist() == [[1.0, 0.5, 1.5], [2.0, 2.0, 0.5]]
    assert score.tolist() == [1.5, 2.0]


def test_threshold_adaptive_with_floor() -> None:
    scorer = AnomalyScorer(OperatorSettings(threshold_sigma=3.0, min_threshold=4.0))
    thr = scorer.threshold(torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([0.25, 4.0, -1.0, 0.0]))
    assert thr.tolist() == [4.0, 8.0, 4.0, 5.0]


def test_severity() -> None:
    assert AnomalyScorer.severity(8.0, 4.0) == "critical"
    assert AnomalyScorer.severity(7.9, 4.0) == "warning"


def run_machine(s: OperatorSettings, scores: list[float], ts_s: list[float] | None = None,
                cond: list[bool] | None = None, warm: list[bool] | None = None, thr: float = 4.0,
                ) -> tuple[list[bool], list[bool], list[bool]]:
    """One device through AnomalyScorer.step; returns (opened, in_alert, learn) per reading."""
    scorer = AnomalyScorer(s)
    n = len(scores)
    ts_s = ts_s or [float(i) for i in range(n)]
    cond = cond or [False] * n
    warm = warm or [True] * n
    state = AlertState(torch.tensor([False]), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                       torch.zeros(1, dtype=torch.int32))
    opened, in_alert, learn = [], [], []
    for i in range(n):
        step = scorer.step(state, torch.tensor([scores[i]]), torch.tensor([thr]), torch.tensor([cond[i]]),
                           torch.tensor([T0 + int(ts_s[i] * 1000)]), warm=torch.tensor([warm[i]]))
        state = step.state
        opened.append(bool(step.opened))
        in_alert.append(bool(step.in_alert))
        learn.append(bool(step.learn))
    return opened, in_alert, learn


HI, LO, MID = 9.0, 1.0, 3.0  # threshold 4, exit below 0.6 * 4 = 2.4


def test_hysteresis_one_alert_per_burst() -> None:
    s = OperatorSettings(exit_after=3, cooldown_s=0.0)
    scores = [LO, HI, LO, MID, HI, LO, LO, HI, LO, LO, LO, LO, HI]
    opened, in_alert, learn = run_machine(s, scores)
    # MID (between exit level and threshold) neither triggers nor counts as calm.
    assert opened == [False, True] + [False] * 10 + [True]
    assert in_alert == [False] + [True] * 9 + [False, False, True]
    assert learn == [not a for a in [False] + [True] * 10 + [False, True]]  # the closing reading does not learn
    # Without hysteresis (exit after one calm reading) the same burst splits into several alerts.
    assert sum(run_machine(OperatorSettings(exit_after=1, cooldown_s=0.0), scores)[0]) == 4


def test_cooldown_suppresses_second_alert() -> None:
    s = OperatorSettings(exit_after=1, cooldown_s=5.0)
    scores = [HI, LO, HI, LO, LO, LO, HI, LO, HI]
    ts = [0, 1, 2, 3, 4, 5.999, 6, 7, 20]  # closes at t=1, cooldown until t=6 (inclusive)
    opened, in_alert, _ = run_machine(s, scores, ts_s=ts)
    assert opened == [True, False, False, False, False, False, True, False, True]
    assert in_alert == [True, False, False, False, False, False, True, False, True]


def test_max_alert_duration_closes_long_alert() -> None:
    s = OperatorSettings(max_alert_s=10.0, cooldown_s=3.0)
    opened, in_alert, _ = run_machine(s, [HI] * 20)
    # Opens at t=0, still open at t=10 (not longer than 10 s), closed at t=11, cooldown until 14, reopens.
    assert in_alert[:11] == [True] * 11 and in_alert[11:14] == [False] * 3 and in_alert[14]
    assert [i for i, o in enumerate(opened) if o] == [0, 14]


def test_warmup_blocks_alerts_and_nan_never_triggers() -> None:
    s = OperatorSettings()
    opened, _, learn = run_machine(s, [HI] * 5 + [math.nan, HI], warm=[False] * 5 + [True, True])
    assert opened == [False] * 6 + [True] and learn == [True] * 6 + [False]


def test_condition_opens_and_keeps_alert_open() -> None:
    s = OperatorSettings(exit_after=2, cooldown_s=0.0)
    opened, in_alert, _ = run_machine(s, [LO] * 7, cond=[False, True, True, True, False, False, False])
    assert opened == [False, True, False, False, False, False, False]
    assert in_alert == [False, True, True, True, True, False, False]


def reference_step(st_: tuple[bool, int, int, int], score: float, thr: float, cond: bool, ts: int, warm: bool,
                   s: OperatorSettings) -> tuple[tuple[bool, int, int, int], bool, bool, bool]:
    """The documented machine for one device; returns (new state, opened, in_alert, learn)."""
    is_open, since, cooldown, calm = st_
    if not is_open:
        if (score > thr or cond) and warm and ts >= cooldown:
            return (True, ts, cooldown, 0), True, True, False
        return (False, since, cooldown, 0), False, False, True
    calm = calm + 1 if (score < s.exit_ratio * thr and not cond) else 0
    if calm >= s.exit_after or ts - since > s.max_alert_s * 1000:
        return (False, since, ts + int(s.cooldown_s * 1000), 0), False, False, False
    return (True, since, cooldown, calm), False, True, False


@st.composite
def machine_runs(draw: st.DrawFn) -> tuple[OperatorSettings, list[list[tuple[float, float, bool, int, bool]]]]:
    s = OperatorSettings(exit_after=draw(st.integers(1, 3)), cooldown_s=draw(st.sampled_from([0.0, 2.0, 5.0])),
                         max_alert_s=draw(st.sampled_from([3.0, 8.0, 1000.0])),
                         exit_ratio=draw(st.sampled_from([0.5, 1.0])))
    rows, n = draw(st.integers(1, 4)), draw(st.integers(1, 25))
    steps = []
    for _ in range(n):
        row = []
        for _ in range(rows):
            row.append((draw(st.sampled_from([0.5, 1.5, 2.5, 3.5, 5.0, 9.0, math.nan])),
                        draw(st.sampled_from([3.0, 4.0, 6.0])), draw(st.booleans()) and draw(st.booleans()),
                        draw(st.integers(0, 3000)), draw(st.booleans()) or draw(st.booleans())))
        steps.append(row)
    return s, steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machine_runs())
def test_step_matches_reference_machine(run: tuple[OperatorSettings, list[list[Any]]]) -> None:
    s, steps = run
    scorer = AnomalyScorer(s)
    b = len(steps[0])
    state = AlertState(torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.int64),
                       torch.zeros(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int32))
    ref = [(False, 0, 0, 0)] * b
    clock = [T0] * b
    for row in steps:
        for j, (_, _, _, gap, _) in enumerate(row):
            clock[j] += gap
        out = scorer.step(state, torch.tensor([r[0] for r in row]), torch.tensor([r[1] for r in row]),
                          torch.tensor([r[2] for r in row]), torch.tensor(clock, dtype=torch.int64),
                          warm=torch.tensor([r[4] for r in row]))
        for j, (score, thr, cond, _, warm) in enumerate(row):
            ref[j], opened, in_alert, learn = reference_step(ref[j], score, thr, cond, clock[j], warm, s)
            got = (bool(out.state.open[j]), int(out.state.since_ms[j]), int(out.state.cooldown_ms[j]),
                   int(out.state.calm[j]))
            assert (bool(out.opened[j]), bool(out.in_alert[j]), bool(out.learn[j])) == (opened, in_alert, learn)
            assert got == ref[j]
        state = out.state


# ------------------------------------------------------------------------------------------------ operator
def make_op(**kw: Any) -> LiquidOperator:
    torch.manual_seed(0)
    kw.setdefault("warmup_events", 20)
    return LiquidOperator(Forecaster(n_channels=C, hidden_size=8, cell="cfc", head_units=16), OperatorSettings(**kw))


def signal(n: int, seed: int, noise: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    return (np.sin(2 * np.pi * t / 20 + np.arange(C)) + noise * rng.standard_normal((n, C))).astype(np.float32)


def run_devices(op: LiquidOperator, series: dict[str, np.ndarray], gap_ms: int = 1000,
                start: int = 0) -> dict[str, Any]:
    """Process several devices' readings as one interleaved batch; per-device results back."""
    n = len(next(iter(series.values())))
    ids = [d for _ in range(n) for d in series]
    ts = np.repeat(T0 + gap_ms * (start + np.arange(n)), len(series))
    vals = np.stack([series[d][i] for i in range(n) for d in series])
    res = op.process(ids, ts, vals)
    out: dict[str, Any] = {}
    for k, d in enumerate(series):
        sel = np.arange(k, len(ids), len(series))
        pos = {int(p): i for i, p in enumerate(sel)}
        out[d] = {"is_alert": res.is_alert[sel], "score": res.score[sel], "threshold": res.threshold[sel],
                  "alerts": [(pos[a.index], a) for a in res.alerts if a.device_id == d]}
    return out


def store_row(op: LiquidOperator, dev: str) -> dict[str, np.ndarray]:
    r = int(op.store.lookup([dev])[0])
    return {k: v[r].cpu().numpy().copy() for k, v in op.store.tensors.items()}


def test_spike_after_warmup_gives_one_alert_naming_channel() -> None:
    n = 60
    base = {f"d{ch}": signal(n, seed=ch) for ch in range(C)}
    series = {d: v.copy() for d, v in base.items()}
    for ch in range(C):
        series[f"d{ch}"][40, ch] += 10.0  # device d<ch>: a spike on channel ch
    series["early"] = signal(n, seed=9)
    series["early"][6, 1] += 10.0  # during warm-up
    series["calm"] = signal(n, seed=10)
    out = run_devices(make_op(), series)
    for ch in range(C):
        alerts = out[f"d{ch}"]["alerts"]
        assert len(alerts) == 1, alerts
        i, a = alerts[0]
        assert i == 40 and a.channels[0] == ch and a.reason == "forecast_deviation"
        assert a.score > a.threshold and a.ts_ms == T0 + 40_000
        assert a.severity == ("critical" if a.score >= 2 * a.threshold else "warning")
        assert out[f"d{ch}"]["is_alert"][40] and not out[f"d{ch}"]["is_alert"][:40].any()
    assert out["early"]["alerts"] == [] and out["early"]["score"][6] > out["early"]["threshold"][6]
    assert out["calm"]["alerts"] == [] and not out["calm"]["is_alert"].any()


@pytest.mark.parametrize(("cooldown_s", "n_alerts"), [(60.0, 1), (0.0, 2)])
def test_cooldown_through_operator(cooldown_s: float, n_alerts: int) -> None:
    v = signal(70, seed=3)
    v[30, 0] += 10.0
    v[50, 2] += 10.0  # 20 s later: closed by then (exit_after=3), but inside a 60 s cooldown
    out = run_devices(make_op(exit_after=3, cooldown_s=cooldown_s), {"d": v})["d"]
    assert [i for i, _ in out["alerts"]] == [30, 50][:n_alerts]
    assert out["is_alert"][30] and not out["is_alert"][40:50].any()


def test_statistics_frozen_while_alert_open() -> None:
    n_pre, n_in = 40, 12
    v = signal(n_pre + n_in, seed=4)
    v[n_pre, 1] += 15.0  # opens the alert
    v[n_pre + 1:, :] += 3.0  # then a level shift on every channel while it is open
    frozen = ("mean", "var", "score_mean", "score_var", "calib")
    results = {}
    for name, warmup in (("alerting", 20), ("control", 10**6)):  # control: never alerts, always learns
        op = make_op(warmup_events=warmup, exit_after=10**3, max_alert_s=1e6)
        run_devices(op, {"d": v[:n_pre]})
        before = store_row(op, "d")
        out = run_devices(op, {"d": v[n_pre:]}, start=n_pre)["d"]
        results[name] = (before, store_row(op, "d"), out)
    before, after, out = results["alerting"]
    assert out["is_alert"].all() and len(out["alerts"]) == 1
    for k in frozen:
        assert np.array_equal(before[k], after[k]), f"{k} learned inside an alert"
    assert not np.array_equal(before["h"], after["h"])  # the cell itself still advances
    before, after, out = results["control"]
    assert not out["is_alert"].any()
    assert (after["mean"] - before["mean"]).min() > 0.01, "control: the shift must move the statistics"


def test_stuck_sensor_alert() -> None:
    s = OperatorSettings().stuck_after
    v = signal(70, seed=5)
    start = 30
    v[start:start + 20, 3] = 0.25  # channel 3 repeats one value exactly
    near = signal(70, seed=6)
    near[start:start + 20, 3] = 0.25 + 1e-3 * np.arange(20, dtype=np.float32)  # flat-ish but not repeated
    out = run_devices(make_op(exit_after=2), {"stuck": v, "near": near})
    alerts = out["stuck"]["alerts"]
    assert len(alerts) == 1
    i, a = alerts[0]
    assert a.reason == "stuck_sensor" and a.channels[0] == 3
    assert i == start + s  # the value first seen at `start`, then repeated stuck_after times
    assert out["stuck"]["is_alert"][i:start + 20].all(), "stays open while the channel is stuck"
    assert not out["stuck"]["is_alert"][start + 25:].any(), "closes once the channel moves again"
    assert [a.reason for _, a in out["near"]["alerts"]] == []


def test_max_alert_s_through_operator() -> None:
    v = signal(60, seed=7)
    v[25:, 0] = 1.5  # stuck for good from reading 25: alert opens at 25 + stuck_after
    out = run_devices(make_op(stuck_after=4, max_alert_s=10.0, cooldown_s=5.0), {"d": v})["d"]
    opened = [i for i, _ in out["alerts"]]
    assert opened[0] == 29
    # open for readings 29..39 (t - since <= 10 s), closed at 40, cooldown until 45, then reopens (still stuck)
    assert out["is_alert"][29:40].all() and not out["is_alert"][40:45].any()
    assert opened[1] == 45


# ------------------------------------------------------------------ fixed reference (SKAB-style settings)
QUIET = {"min_threshold": 1e6, "threshold_sigma": 1e3, "sustained_ratio": 1e6, "level_sigma": 1e6, "hold_sigma": 1e6}


@pytest.mark.parametrize("reference_level", [False, True])
def test_reference_events_freeze_the_spread(reference_level: bool) -> None:
    rng = np.random.default_rng(3)
    v = rng.standard_normal((300, C)).astype(np.float32)
    v[100:] *= 4.0  # the spread quadruples after the reference period
    v[100:] += np.linspace(0.0, 6.0, 200, dtype=np.float32)[:, None]  # and the level drifts upwards
    out = {}
    for name, kw in (("ref", {"reference_events": 100, "reference_level": reference_level}), ("adaptive", {})):
        op = make_op(**QUIET, stats_alpha=0.05, **kw)
        run_devices(op, {"d": v[:100]})
        at_ref = store_row(op, "d")
        run_devices(op, {"d": v[100:]}, start=100)
        out[name] = (at_ref, store_row(op, "d"))
    (ref_at, ref_end), (_, ad_end) = out["ref"], out["adaptive"]
    assert np.array_equal(ref_at["var"], ref_end["var"]), "the spread must stay the reference's"
    assert (ad_end["var"] > 4.0 * ref_end["var"]).all(), "control: without a reference the spread learns"
    if reference_level:
        assert np.array_equal(ref_at["mean"], ref_end["mean"])
    else:
        assert (ref_end["mean"] - ref_at["mean"]).min() > 2.0, "the level keeps following the drift"


def test_learn_calm_channels_follow_drift_inside_alert() -> None:
    n = 160
    v = signal(n, seed=8, noise=0.05)
    v[:, 1] = 0.05 * np.random.default_rng(9).standard_normal(n)
    v[60:, 0] += 50.0  # channel 0: a collective anomaly that holds an alert open
    v[60:, 1] += np.linspace(0.0, 0.3, n - 60, dtype=np.float32)  # channel 1: slow drift within hold_sigma
    ends = {}
    for calm in (False, True):
        op = make_op(stats_alpha=0.05, reference_events=40, learn_calm_channels=calm, level_sigma=6.0,
                     hold_sigma=4.0, max_alert_s=1e6)
        run_devices(op, {"d": v[:60]})
        before = store_row(op, "d")
        res = run_devices(op, {"d": v[60:]}, start=60)["d"]
        assert res["is_alert"].all(), "the shift on channel 0 holds one alert open"
        ends[calm] = (before, store_row(op, "d"))
    (b0, e0), (b1, e1) = ends[False], ends[True]
    assert np.array_equal(b0["mean"], e0["mean"]), "default: nothing learns inside an alert"
    assert e1["mean"][1] - b1["mean"][1] > 0.1, "a calm channel keeps following its slow drift"
    assert e1["mean"][0] == b1["mean"][0], "the abnormal channel stays frozen"


def test_reference_events_validated() -> None:
    with pytest.raises(ConfigError, match="reference_events"):
        OperatorSettings(reference_events=-1)
