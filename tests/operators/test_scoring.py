"""The anomaly likelihood and the alert state machine: alone (against a reference machine), then through the
operator (spikes, level shifts, warm-up, commissioning, frozen statistics during alerts, stuck sensors,
cooldown, maximum duration, the alert_probability knob)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liquidstream.operators import AnomalyScorer, Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.errors import ConfigError, InputError
from liquidstream.operators.scoring import MIN_READINGS, AlertState, Likelihood, learn, surprise
from tests.operators.conftest import BOTH_PATHS

T0 = 1_700_000_000_000
C = 4
HIST = 200  # readings of normal history before an injected incident: the likelihood has settled by then


# ------------------------------------------------------------------------------------------------ likelihood
def fresh(b: int, c: int = 2) -> Likelihood:
    return Likelihood(torch.ones(c, b), torch.zeros(b), torch.zeros(b), torch.ones(b), torch.ones(b))


def feed(residuals: torch.Tensor) -> tuple[Likelihood, list[torch.Tensor], list[torch.Tensor]]:
    """Residuals [T, C, B] through one likelihood, always learning; log10 p per reading, calibrated and raw."""
    lik, out, raw = fresh(residuals.shape[2], residuals.shape[1]), [], []
    n = torch.zeros(residuals.shape[2], dtype=torch.int32)
    for r in residuals:
        s = surprise(lik, r, n, torch.ones_like(n, dtype=torch.bool))
        lik = learn(lik, r, s, n, torch.ones_like(n, dtype=torch.bool))
        n = n + 1
        out.append(s.log10_p)
        raw.append(s.log10_p_raw)
    return lik, out, raw


def test_likelihood_reports_nothing_until_it_has_learnt() -> None:
    _, lps, _ = feed(30.0 * torch.randn(MIN_READINGS + 5, 2, 3, generator=torch.Generator().manual_seed(0)))
    assert all((lp == 0).all() for lp in lps[:MIN_READINGS])
    assert all((lp <= 0).all() and torch.isfinite(lp).all() for lp in lps)


def test_likelihood_is_monotone_in_the_residual_and_calibrated_on_noise() -> None:
    g = torch.Generator().manual_seed(1)
    lik, lps, _ = feed(torch.randn(3000, 2, 1, generator=g))
    lp = torch.cat(lps[500:])
    assert float((lp < -2).float().mean()) < 0.03, "normal readings are rarely surprising"
    assert float((lp < -4).float().mean()) < 1e-3
    n = torch.full((4,), 3000, dtype=torch.int32)
    big = Likelihood(*(t.expand(*t.shape[:-1], 4).clone() for t in (lik.s2, lik.m, lik.mu, lik.v, lik.cal)))
    r = torch.tensor([[0.0, 2.0, 8.0, 40.0], [0.0, 0.0, 0.0, 0.0]])
    p = surprise(big, r, n, torch.ones(4, dtype=torch.bool)).log10_p
    assert (p[1:] <= p[:-1]).all() and p[-1] < p[0], p
    # one channel of two is enough: the surprise is the largest channel's, not an average
    both = surprise(big, torch.tensor([[40.0] * 4, [40.0] * 4]), n, torch.ones(4, dtype=torch.bool)).log10_p
    assert float(both[0]) == pytest.approx(float(p[-1]), abs=1e-5)


def test_calibration_factor_is_the_observed_rate_of_tail_hits() -> None:
    for seed, scale in ((2, 1.0), (3, 0.2)):
        rng = np.random.default_rng(seed)
        r = rng.standard_normal((1500, 1, 1)) * np.where(rng.random((1500, 1, 1)) < 0.05, 10.0, scale)
        lik, _, raw = feed(torch.from_numpy(r.astype(np.float32)))
        hits = float((torch.cat(raw[MIN_READINGS:-1]) < -2).float().mean())
        assert float(lik.cal) == pytest.approx(hits / 0.01, rel=0.05, abs=0.05)


# ------------------------------------------------------------------------------------------------ machine
def test_threshold_and_severity() -> None:
    scorer = AnomalyScorer(OperatorSettings(alert_probability=1e-4))
    assert scorer.threshold == pytest.approx(4.0)
    assert AnomalyScorer.severity(8.0, 4.0) == "critical"
    assert AnomalyScorer.severity(7.9, 4.0) == "warning"


def new_state(b: int) -> AlertState:
    return AlertState(torch.zeros(b, dtype=torch.bool), *(torch.zeros(b, dtype=torch.int32) for _ in range(3)))


def run_machine(s: OperatorSettings, lps: list[float], cond: list[bool] | None = None,
                warm: list[bool] | None = None) -> tuple[list[bool], list[bool], list[bool]]:
    """One device through AnomalyScorer.step; returns (opened, in_alert, learn) per reading."""
    scorer = AnomalyScorer(s)
    n = len(lps)
    cond = cond or [False] * n
    warm = warm or [True] * n
    state = new_state(1)
    opened, in_alert, learn_ = [], [], []
    for i in range(n):
        step = scorer.step(state, torch.tensor([lps[i]]), torch.tensor([cond[i]]), warm=torch.tensor([warm[i]]))
        state = step.state
        opened.append(bool(step.opened))
        in_alert.append(bool(step.in_alert))
        learn_.append(bool(step.learn))
    return opened, in_alert, learn_


HI, LO, MID = -6.0, -0.5, -3.0  # alert_probability 1e-4: opens below -4, calm above -2


def test_hysteresis_one_alert_per_burst() -> None:
    s = OperatorSettings(exit_after=3, cooldown_events=0)
    lps = [LO, HI, LO, MID, HI, LO, LO, HI, LO, LO, LO, LO, HI]
    opened, in_alert, learn_ = run_machine(s, lps)
    # MID (between the calm level and the threshold) neither triggers nor counts as calm.
    assert opened == [False, True] + [False] * 10 + [True]
    assert in_alert == [False] + [True] * 9 + [False, False, True]
    assert learn_ == [not a for a in [False] + [True] * 10 + [False, True]]  # the closing reading does not learn
    # Without hysteresis (exit after one calm reading) the same burst splits into several alerts.
    assert sum(run_machine(OperatorSettings(exit_after=1, cooldown_events=0), lps)[0]) == 4


def test_cooldown_counts_readings() -> None:
    s = OperatorSettings(exit_after=1, cooldown_events=4)
    opened, in_alert, _ = run_machine(s, [HI, LO, HI, HI, HI, HI, HI, LO])
    # closes at reading 1, readings 2-5 are cooling down, 6 opens again
    assert opened == [True, False, False, False, False, False, True, False]
    assert in_alert == [True, False, False, False, False, False, True, False]


def test_max_alert_events_closes_long_alert() -> None:
    s = OperatorSettings(max_alert_events=10, cooldown_events=3)
    opened, in_alert, _ = run_machine(s, [HI] * 20)
    # opens at 0, open for readings 0-9, closed at 10, cooling down 11-13, reopens at 14
    assert in_alert[:10] == [True] * 10 and in_alert[10:14] == [False] * 4 and in_alert[14]
    assert [i for i, o in enumerate(opened) if o] == [0, 14]


def test_warmup_blocks_alerts_and_nan_never_triggers() -> None:
    opened, _, learn_ = run_machine(OperatorSettings(), [HI] * 5 + [math.nan, HI], warm=[False] * 5 + [True, True])
    assert opened == [False] * 6 + [True] and learn_ == [True] * 6 + [False]


def test_condition_opens_and_keeps_alert_open() -> None:
    s = OperatorSettings(exit_after=2, cooldown_events=0)
    opened, in_alert, _ = run_machine(s, [LO] * 7, cond=[False, True, True, True, False, False, False])
    assert opened == [False, True, False, False, False, False, False]
    assert in_alert == [False, True, True, True, True, False, False]


def reference_step(st_: tuple[bool, int, int, int], lp: float, cond: bool, warm: bool,
                   s: OperatorSettings) -> tuple[tuple[bool, int, int, int], bool, bool, bool]:
    """The documented machine for one device; returns (new state, opened, in_alert, learn)."""
    is_open, age, cool, calm = st_
    if not is_open:
        if (lp < math.log10(s.alert_probability) or cond) and warm and cool <= 0:
            return (True, 0, 0, 0), True, True, False
        return (False, 0, max(cool - 1, 0), 0), False, False, True
    calm = calm + 1 if (lp > math.log10(100 * s.alert_probability) and not cond) else 0
    age += 1
    if calm >= s.exit_after or age >= s.max_alert_events:
        return (False, 0, s.cooldown_events, 0), False, False, False
    return (True, age, max(cool - 1, 0), calm), False, True, False


@st.composite
def machine_runs(draw: st.DrawFn) -> tuple[OperatorSettings, list[list[tuple[float, bool, bool]]]]:
    s = OperatorSettings(exit_after=draw(st.integers(1, 3)), cooldown_events=draw(st.sampled_from([0, 2, 5])),
                         max_alert_events=draw(st.sampled_from([3, 8, 1000])),
                         alert_probability=draw(st.sampled_from([1e-4, 1e-3])))
    rows, n = draw(st.integers(1, 4)), draw(st.integers(1, 25))
    steps = []
    for _ in range(n):
        steps.append([(draw(st.sampled_from([-0.1, -0.5, -1.5, -2.5, -3.5, -5.0, -9.0, math.nan])),
                       draw(st.booleans()) and draw(st.booleans()), draw(st.booleans()) or draw(st.booleans()))
                      for _ in range(rows)])
    return s, steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machine_runs())
def test_step_matches_reference_machine(run: tuple[OperatorSettings, list[list[Any]]]) -> None:
    s, steps = run
    scorer = AnomalyScorer(s)
    b = len(steps[0])
    state = new_state(b)
    ref = [(False, 0, 0, 0)] * b
    for row in steps:
        out = scorer.step(state, torch.tensor([r[0] for r in row]), torch.tensor([r[1] for r in row]),
                          warm=torch.tensor([r[2] for r in row]))
        for j, (lp, cond, warm) in enumerate(row):
            ref[j], opened, in_alert, learn_ = reference_step(ref[j], lp, cond, warm, s)
            got = (bool(out.state.open[j]), int(out.state.age[j]), int(out.state.cooldown[j]), int(out.state.calm[j]))
            assert (bool(out.opened[j]), bool(out.in_alert[j]), bool(out.learn[j])) == (opened, in_alert, learn_)
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
                  "anomaly_score": res.anomaly_score[sel],
                  "alerts": [(pos[a.index], a) for a in res.alerts if a.device_id == d]}
    return out


def store_row(op: LiquidOperator, dev: str) -> dict[str, np.ndarray]:
    r = int(op.store.lookup([dev])[0])
    return {k: v[r].cpu().numpy().copy() for k, v in op.store.tensors.items()}


@BOTH_PATHS
def test_spike_after_warmup_gives_one_alert_naming_channel() -> None:
    n = HIST + 40
    series = {f"d{ch}": signal(n, seed=ch) for ch in range(C)}
    for ch in range(C):
        series[f"d{ch}"][HIST, ch] += 20.0  # device d<ch>: a spike on channel ch (200 noise sd)
    series["early"] = signal(n, seed=9)
    series["early"][6, 1] += 10.0  # during warm-up
    series["calm"] = signal(n, seed=10)
    out = run_devices(make_op(), series)
    for ch in range(C):
        alerts = out[f"d{ch}"]["alerts"]
        assert len(alerts) == 1, alerts
        i, a = alerts[0]
        # at the spike, or at the reading after it (the return from the spike is a second wild residual: a
        # single reading moves the short mean by a tenth of its surprise)
        assert i in (HIST, HIST + 1) and a.channels[0] == ch and a.reason == "anomaly_likelihood"
        assert a.score > a.threshold == pytest.approx(4.0) and a.ts_ms == T0 + i * 1000
        assert a.severity == ("critical" if a.score >= 2 * a.threshold else "warning")
        assert out[f"d{ch}"]["is_alert"][i] and not out[f"d{ch}"]["is_alert"][:i].any()
    assert out["early"]["alerts"] == []
    assert out["calm"]["alerts"] == [] and not out["calm"]["is_alert"].any()


@BOTH_PATHS
def test_anomaly_score_in_unit_interval_nan_on_first_readings() -> None:
    v = signal(HIST + 20, seed=1)
    v[HIST, 0] += 50.0
    out = run_devices(make_op(), {"a": v, "b": signal(HIST + 20, seed=2)})
    for dev in ("a", "b"):
        a_s, score = out[dev]["anomaly_score"], out[dev]["score"]
        assert np.isnan(a_s[0]) and np.isnan(score[0])
        assert np.isfinite(a_s[1:]).all() and (a_s[1:] >= 0).all() and (a_s[1:] < 1).all()
        np.testing.assert_allclose(a_s[1:], score[1:] / (score[1:] + 10.0), rtol=1e-6)
    assert out["a"]["anomaly_score"][HIST] > 0.3 > np.nanmax(out["b"]["anomaly_score"])


@BOTH_PATHS
def test_level_shift_opens_exactly_one_alert() -> None:
    v = signal(HIST + 100, seed=5)
    v[HIST:HIST + 40, 2] += 5.0  # a collective anomaly: channel 2 sits 5 amplitudes higher for 40 readings
    out = run_devices(make_op(), {"d": v})["d"]
    assert len(out["alerts"]) == 1, out["alerts"]
    i, a = out["alerts"][0]
    assert HIST <= i <= HIST + 5 and a.channels[0] == 2  # the short mean adds up a few readings of it
    assert out["is_alert"][i:HIST + 40].all(), "the absolute forecast keeps the alert open while it lasts"


@BOTH_PATHS
def test_commissioning_readings_never_alert_and_set_commissioning_is_per_device() -> None:
    v = signal(HIST + 60, seed=3)
    v[HIST, 1] += 20.0
    series = {"set": v, "default": v.copy(), "zero": v.copy()}
    op = make_op(commissioning_events=HIST + 10)
    op.set_commissioning(["set", "zero"], [HIST - 40, 0])
    out = run_devices(op, series)
    assert out["default"]["alerts"] == [] and not out["default"]["is_alert"].any(), "inside commissioning"
    assert np.isfinite(out["default"]["score"][1:]).all(), "commissioning readings are still scored"
    for dev in ("set", "zero"):
        assert [i for i, _ in out[dev]["alerts"]] in ([HIST], [HIST + 1]), dev
    assert int(store_row(op, "default")["lik_n"]) > int(store_row(op, "set")["lik_n"]), \
        "commissioning learns from every reading, alert or not"
    with pytest.raises(InputError):
        op.set_commissioning(["a"], [-1])


@BOTH_PATHS
def test_alert_probability_is_monotone() -> None:
    series = {}
    for k, size in enumerate([3.0, 4.0, 6.0, 8.0, 12.0, 20.0]):
        v = signal(HIST + 30, seed=20 + k)
        v[HIST, k % C] += size
        series[f"d{k}"] = v
    counts = []
    for p in (1e-8, 1e-6, 1e-4, 1e-3, 5e-3):
        out = run_devices(make_op(alert_probability=p), series)
        counts.append(sum(len(o["alerts"]) for o in out.values()))
    assert counts == sorted(counts) and counts[0] < counts[-1], counts


@BOTH_PATHS
def test_statistics_frozen_while_alert_open() -> None:
    n_in = 12
    v = signal(HIST + n_in, seed=4)
    v[HIST, 1] += 15.0  # opens the alert
    v[HIST + 1:, :] += 3.0  # then a level shift on every channel while it is open
    frozen = ("mean", "var", "calib", "lik_n", "d_s2", "d_mu", "d_v", "d_cal", "a_s2", "a_mu", "a_v", "a_cal")
    results = {}
    for name, warmup in (("alerting", 20), ("control", 10**6)):  # control: never alerts, always learns
        op = make_op(warmup_events=warmup, exit_after=10**3)
        run_devices(op, {"d": v[:HIST]})
        before = store_row(op, "d")
        out = run_devices(op, {"d": v[HIST:]}, start=HIST)["d"]
        results[name] = (before, store_row(op, "d"), out)
    before, after, out = results["alerting"]
    assert out["is_alert"].all() and len(out["alerts"]) == 1
    for k in frozen:
        assert np.array_equal(before[k], after[k]), f"{k} learned inside an alert"
    assert not np.array_equal(before["h"], after["h"])  # the cell itself still advances
    assert not np.array_equal(before["d_m"], after["d_m"])  # the short mean measures the present
    before, after, out = results["control"]
    assert not out["is_alert"].any()
    assert (after["mean"] - before["mean"]).min() > 0.01, "control: the shift must move the statistics"


@BOTH_PATHS
@pytest.mark.parametrize("model_triggers", [True, False])
def test_stuck_sensor_alert(model_triggers: bool) -> None:
    s = OperatorSettings().stuck_after
    start = HIST
    v = signal(HIST + 60, seed=5)
    v[start:start + 20, 3] = 0.0  # channel 3 repeats one value exactly (its normal level: no level deviation)
    near = signal(HIST + 60, seed=6)
    near[start:start + 20, 3] = 1e-3 * np.arange(20, dtype=np.float32)  # flat-ish but not repeated
    out = run_devices(make_op(level_rule=not model_triggers, model_triggers=model_triggers, exit_after=2),
                      {"stuck": v, "near": near})
    alerts = out["stuck"]["alerts"]
    assert len(alerts) == 1
    i, a = alerts[0]
    assert a.reason == "stuck_sensor" and a.channels[0] == 3
    assert i == start + s  # the value first seen at `start`, then repeated stuck_after times
    assert out["stuck"]["is_alert"][i:start + 20].all(), "stays open while the channel is stuck"
    assert [a.reason for _, a in out["near"]["alerts"]] == []
    # switched off, the same stuck channel opens nothing
    assert run_devices(make_op(exit_after=2, stuck_rule=False), {"stuck": v})["stuck"]["alerts"] == []


@BOTH_PATHS
def test_stuck_rule_learns_legitimate_repeats_during_commissioning() -> None:
    """A channel that repeated values during commissioning (a quantised counter) repeats legitimately: the stuck
    rule leaves it alone afterwards, while the same repeat on a device whose commissioning never repeated (or
    on one without commissioning) opens a stuck_sensor alert."""
    s = OperatorSettings().stuck_after
    v = signal(HIST + 60, seed=5)
    v[HIST:HIST + 20, 3] = 0.0  # stuck after commissioning
    quantised = v.copy()
    quantised[10:11 + s // 2, 3] = quantised[10, 3]  # repeated half the stuck length during commissioning
    op = make_op(exit_after=2)
    op.set_commissioning(["plain", "quantised"], [HIST, HIST])
    out = run_devices(op, {"plain": v, "quantised": quantised})
    assert [a.reason for _, a in out["plain"]["alerts"]] == ["stuck_sensor"]
    assert [a.reason for _, a in out["quantised"]["alerts"]] == []
    row = store_row(op, "quantised")
    assert row["repeats"].tolist() == [False, False, False, True]


@BOTH_PATHS
def test_rules_only_level_likelihood_scores_and_alerts() -> None:
    v = np.random.default_rng(7).standard_normal((HIST + 40, C)).astype(np.float32)
    v[HIST:HIST + 20, 0] += 6.0  # six standard deviations off the device's normal level
    out = run_devices(make_op(model_triggers=False, level_rule=True), {"d": v})["d"]
    assert len(out["alerts"]) == 1
    i, a = out["alerts"][0]
    assert HIST <= i < HIST + 10 and a.reason == "level_deviation" and a.channels[0] == 0
    assert np.isfinite(out["anomaly_score"][1:]).all() and out["anomaly_score"][i] > 0.25


@BOTH_PATHS
def test_max_alert_events_through_operator() -> None:
    v = signal(HIST + 40, seed=7)
    v[HIST:, 0] = 0.0  # stuck for good: the alert opens at HIST + stuck_after
    op = make_op(level_rule=True, model_triggers=False, stuck_after=4, max_alert_events=10, cooldown_events=5)
    out = run_devices(op, {"d": v})["d"]
    opened = [i for i, _ in out["alerts"]]
    o = HIST + 4
    assert opened[:2] == [o, o + 16]  # open for 10 readings, closed on the 10th after, 5 of cooldown
    assert out["is_alert"][o:o + 10].all() and not out["is_alert"][o + 10:o + 16].any()


# ------------------------------------------------------------------ commissioning freezes the spread
@BOTH_PATHS
def test_commissioning_freezes_the_spread() -> None:
    rng = np.random.default_rng(3)
    v = rng.standard_normal((300, C)).astype(np.float32)
    v[100:] *= 4.0  # the spread quadruples after commissioning
    v[100:] += np.linspace(0.0, 6.0, 200, dtype=np.float32)[:, None]  # and the level drifts upwards
    out = {}
    for name, kw in (("ref", {"commissioning_events": 100}), ("adaptive", {})):
        op = make_op(alert_probability=1e-9, stats_alpha=0.05, **kw)
        run_devices(op, {"d": v[:100]})
        at_ref = store_row(op, "d")
        run_devices(op, {"d": v[100:]}, start=100)
        out[name] = (at_ref, store_row(op, "d"))
    (ref_at, ref_end), (_, ad_end) = out["ref"], out["adaptive"]
    assert np.array_equal(ref_at["var"], ref_end["var"]), "the spread must stay commissioning's"
    assert (ad_end["var"] > 4.0 * ref_end["var"]).all(), "control: without commissioning the spread learns"


def test_settings_validated() -> None:
    for kw, match in (({"commissioning_events": -1}, "commissioning_events"),
                      ({"alert_probability": 0.0}, "alert_probability"),
                      ({"alert_probability": 0.05}, "alert_probability"),
                      ({"model_triggers": False, "level_rule": False}, "triggers"),
                      ({"max_alert_events": 0}, "max_alert_events"), ({"cooldown_events": -1}, "cooldown_events")):
        with pytest.raises(ConfigError, match=match):
            OperatorSettings(**kw)
