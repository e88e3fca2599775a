"""Online learning: replay buffer, window assembly, each guard on its own, swap and rollback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# OnlineSettings is a pydantic model; the lent GPU machines' image has no pydantic unless it is carried there.
pydantic = pytest.importorskip("pydantic")

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings  # noqa: E402
from liquidstream.operators.errors import InputError  # noqa: E402
from liquidstream.operators.online.config import GUARDS, OnlineSettings  # noqa: E402
from liquidstream.operators.online.guards import LiveError, device_median, learnable, project, relative_drift  # noqa: E402
from liquidstream.operators.online.learner import OnlineLearner  # noqa: E402
from liquidstream.operators.online.replay_buffer import ReplayBuffer  # noqa: E402
from liquidstream.operators.result import StepResult  # noqa: E402
from liquidstream.operators.training import Trainer, rollout_terms  # noqa: E402
from liquidstream.operators.window_assembler import WindowAssembler  # noqa: E402

T0 = 1_767_225_600_000


def _stream(devices: int, n: int, seed: int = 0, channels: int = 2) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sinusoids with noise at irregular gaps (0.5-1.5 s), devices interleaved in event-time order."""
    rng = np.random.default_rng(seed)
    gaps = rng.integers(500, 1500, size=(devices, n), endpoint=True)
    ts = T0 + np.cumsum(gaps, axis=1)
    period = rng.uniform(8, 30, size=(devices, 1, channels))
    vals = np.sin(2 * np.pi * (ts - T0)[:, :, None] / 1000.0 / period) + 0.05 * rng.normal(size=(devices, n, channels))
    order = np.argsort(ts.reshape(-1), kind="stable")
    dev = np.repeat(np.arange(devices), n)[order]
    return [f"d{i}" for i in dev], ts.reshape(-1)[order], vals.reshape(-1, channels)[order].astype(np.float32)


def _model(seed: int = 0) -> Forecaster:
    torch.manual_seed(seed)
    return Forecaster(n_channels=2, hidden_size=8, cell="liquid", head_units=16)


def _learner(**kw: object) -> OnlineLearner:
    base: dict[str, object] = {"window": 8, "batch_windows": 16, "steps_per_update": 3, "min_windows": 8} | kw
    return OnlineLearner(_model(), OperatorSettings(), OnlineSettings(**base))  # type: ignore[arg-type]


def _blank(n: int, hidden: int = 2, channels: int = 1) -> dict[str, np.ndarray]:
    return WindowAssembler(window=2, n_channels=channels, hidden_size=hidden, max_devices=1).blank_state(n)


# ---------------------------------------------------------------------------------------------- settings
def test_settings_validate_and_unguarded_turns_every_guard_off() -> None:
    with pytest.raises(pydantic.ValidationError):
        OnlineSettings(window=1)
    with pytest.raises(pydantic.ValidationError):
        OnlineSettings(max_device_share=0.0)
    on, off = OnlineSettings(), OnlineSettings.unguarded(lr=0.5)
    assert all(getattr(on, g) for g in GUARDS) and not any(getattr(off, g) for g in GUARDS)
    assert off.lr == 0.5
    with pytest.raises(pydantic.ValidationError):
        on.window = 4  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- buffer
def _fill(buf: ReplayBuffer, devices: list[str]) -> None:
    w = buf.window
    for i, dev in enumerate(devices):
        v = np.full((1, w, 1), float(i), np.float32)
        buf.add([dev], v, np.ones((1, w), np.float32), np.ones((1, w), bool), _blank(1))


def test_buffer_is_bounded_evicts_oldest_and_caps_devices() -> None:
    buf = ReplayBuffer(window=3, n_channels=1, hidden_size=2, capacity=5, max_per_device=2)
    nbytes = buf.nbytes()
    _fill(buf, ["a", "a", "a", "b", "c", "d", "e", "f"])
    assert len(buf) == 5 and buf.nbytes() == nbytes
    held = buf.windows_per_device()
    assert held == {"b": 1, "c": 1, "d": 1, "e": 1, "f": 1}  # a's windows were the oldest
    # per device: a fast device keeps only its newest max_per_device windows
    buf2 = ReplayBuffer(window=3, n_channels=1, hidden_size=2, capacity=10, max_per_device=2)
    _fill(buf2, ["x"] * 6 + ["y"])
    assert buf2.windows_per_device() == {"x": 2, "y": 1}
    x_vals = sorted(float(buf2.values[s, 0, 0]) for s in buf2.slots(holdout=False) if buf2.device_code[s] ==
                    buf2.device_code[buf2.slots(holdout=False)[0]])
    assert x_vals == [4.0, 5.0]
    # one burst larger than the buffer: only its newest windows stay
    burst = ReplayBuffer(window=3, n_channels=1, hidden_size=2, capacity=4)
    vals = np.arange(9, dtype=np.float32)[:, None, None] * np.ones((9, 3, 1), np.float32)
    burst.add([f"z{i}" for i in range(9)], vals, np.ones((9, 3), np.float32), np.ones((9, 3), bool), _blank(9))
    assert sorted(burst.windows_per_device()) == ["z5", "z6", "z7", "z8"] and burst.evicted == 5
    # without the cap one device can fill the whole buffer
    free = ReplayBuffer(window=3, n_channels=1, hidden_size=2, capacity=4, max_per_device=None)
    _fill(free, ["y"] + ["x"] * 6)
    assert free.windows_per_device() == {"x": 4}


def test_holdout_windows_are_never_sampled_for_training() -> None:
    buf = ReplayBuffer(window=2, n_channels=1, hidden_size=2, capacity=200, holdout_fraction=0.3, seed=1)
    _fill(buf, [f"d{i % 7}" for i in range(200)])
    hold, train = buf.slots(holdout=True), buf.slots(holdout=False)
    assert 30 < len(hold) < 90 and len(hold) + len(train) == 200
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert not np.isin(buf.sample(32, rng), hold).any()


def test_device_cap_limits_one_device_in_a_batch() -> None:
    buf = ReplayBuffer(window=2, n_channels=1, hidden_size=2, capacity=100)
    _fill(buf, ["loud"] * 80 + [f"q{i}" for i in range(20)])
    rng = np.random.default_rng(0)
    capped = buf.gather(buf.sample(40, rng, per_device_cap=2))
    loud = buf._codes["loud"]
    assert int((capped.devices == loud).sum()) <= 2 and len(capped) == 22
    free = buf.gather(buf.sample(40, rng))
    assert len(free) == 40 and int((free.devices == loud).sum()) > 20


# ---------------------------------------------------------------------------------------------- windows
def test_assembler_cuts_windows_in_event_time_with_real_gaps_whatever_the_arrival_order() -> None:
    ids, ts, vals = _stream(3, 20)
    got: dict[int, list[tuple[str, list[float], list[float]]]] = {}
    for run, perm in enumerate([np.arange(len(ids)), np.random.default_rng(1).permutation(len(ids))]):
        asm = WindowAssembler(window=6, n_channels=2, hidden_size=2, max_devices=10)
        asm.track(["d0", "d1", "d2"], _blank(3, channels=2), np.full(3, -1))
        seen: list[tuple[str, list[float], list[float]]] = []

        def done(full, seen=seen):  # type: ignore[no-untyped-def]
            seen.extend((d, full.dt[i].tolist(), full.values[i, :, 0].tolist()) for i, d in enumerate(full.device_ids))
            return {k: v + 1.0 for k, v in full.state.items()}  # a recognisable "end state"

        asm.feed([ids[i] for i in perm], ts[perm], vals[perm], np.ones(len(ids), bool), done)
        got[run] = sorted(seen)
    assert got[0] == got[1] and len(got[0]) == 9  # 3 devices x 3 full windows, 2 readings left pending each
    d0 = [w for w in got[0] if w[0] == "d0"]
    own = np.flatnonzero(np.array(ids) == "d0")
    expected_dt = np.diff(ts[own], prepend=ts[own][0]) / 1000.0
    assert np.allclose(sum((w[1] for w in d0), []), expected_dt[:18])


def test_assembler_tracks_at_most_max_devices() -> None:
    asm = WindowAssembler(window=2, n_channels=1, hidden_size=2, max_devices=2)
    asm.track(["a", "b", "c"], _blank(3), np.full(3, -1))
    assert len(asm) == 2 and "c" not in asm
    n = asm.feed(["a", "c", "b"], np.array([1, 2, 3]), np.zeros((3, 1), np.float32), np.ones(3, bool),
                 lambda full: full.state)
    assert n == 2
    assert asm.evict_idle(now_ms=10_000, ttl_s=5.0) == 2 and len(asm) == 0


def test_windows_chain_from_the_serving_state() -> None:
    """All readings learnable: a window's carried state is the operator's own state at that reading."""
    learner = _learner(window=10, buffer_windows=64)
    ids, ts, vals = _stream(4, 30, seed=2)
    learner.observe(ids, ts, vals)  # 30 readings per device: 3 full windows, pending start = now
    op: LiquidOperator = learner.operator
    asm = learner.assembler
    for dev in ("d0", "d3"):
        row_op, row_asm = op.store.lookup([dev])[0], asm._index[dev]
        for name in ("h", "x_last", "mean", "var"):
            ours = asm._arrays[f"state_{name}"][row_asm]
            served = op.store.tensors[name][row_op].numpy()
            assert np.allclose(ours, served, atol=1e-4), name
        assert asm._arrays["state_count"][row_asm] == 30


# ---------------------------------------------------------------------------------------------- guards
def test_alert_guard_masks_alerts_and_high_scores() -> None:
    res = StepResult(status=np.zeros(4, np.int8), long_gap=np.zeros(4, bool), forecast=np.zeros((4, 1), np.float32),
                     forecast_std=np.ones((4, 1), np.float32), horizon_s=np.ones(4, np.float32),
                     score=np.array([np.nan, 1.0, 9.0, 1.0], np.float32), threshold=np.full(4, 5.0, np.float32),
                     is_alert=np.array([False, False, False, True]), ts_ms=np.arange(4, dtype=np.int64),
                     anomaly_score=np.array([np.nan, 1 / 11, 9 / 19, 1 / 11], np.float32))
    assert learnable(res, OnlineSettings(max_score=5.0)).tolist() == [True, True, False, False]
    assert learnable(res, OnlineSettings.unguarded()).all()


def test_alert_guard_keeps_an_incident_out_of_the_buffer() -> None:
    ids, ts, vals = _stream(4, 120, seed=3)
    hit = (np.array(ids) == "d1") & (ts > np.sort(ts[np.array(ids) == "d1"])[80])
    vals = vals.copy()
    vals[hit] += 40.0  # an incident: d1's level jumps by ~60 standard deviations and stays there
    dropped = {}
    for guarded in (True, False):
        learner = _learner(window=8, guard_alerts=guarded, max_windows_per_device=100)
        stats = learner.observe(ids, ts, vals)
        assert (stats.learnable < stats.applied) == guarded
        dropped[guarded] = stats.windows_dropped  # without the guard: only the first, warm-up-only, windows
        kept = learner.buffer.windows_per_device()
        assert (kept.get("d1", 0) < kept["d0"]) == guarded
    assert dropped[True] > dropped[False]


def test_validation_guard_rejects_a_candidate_without_a_margin() -> None:
    ids, ts, vals = _stream(12, 120, seed=4)
    for guard, reason in ((True, "no_improvement"), (False, "accepted")):
        learner = _learner(lr=1e-9, min_improvement=0.05, guard_validation=guard)
        learner.observe(ids, ts, vals)
        d = learner.learn()
        assert d.reason == reason
        assert d.figures["candidate_val_mse"] == pytest.approx(d.figures["serving_val_mse"], rel=1e-3)
        assert (d.state_dict is not None) == d.accepted == (not guard)


def test_drift_guard_projects_or_rejects_a_large_update() -> None:
    ids, ts, vals = _stream(12, 120, seed=5)
    for mode in ("project", "reject"):
        learner = _learner(lr=0.2, steps_per_update=5, max_drift=0.01, drift_mode=mode, guard_validation=False)
        learner.observe(ids, ts, vals)
        before = {k: v.clone() for k, v in learner.model.state_dict().items()}
        d = learner.learn()
        assert d.figures["drift_raw"] > 0.01
        if mode == "project":
            assert d.accepted and d.state_dict is not None
            assert relative_drift(d.state_dict, before) == pytest.approx(0.01, rel=1e-3)
        else:
            assert not d.accepted and d.reason == "drift_exceeded"
    off = _learner(lr=0.2, steps_per_update=5, max_drift=0.01, guard_drift=False, guard_validation=False)
    off.observe(ids, ts, vals)
    assert off.learn().figures["drift"] > 0.01


def test_project_and_drift_helpers() -> None:
    old = {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(3)}
    new = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    assert relative_drift(new, old) == pytest.approx(1.0)
    p = project(new, old, 0.25)
    assert torch.allclose(p["w"], torch.tensor([1.0, 0.25])) and int(p["n"]) == 3
    assert project(new, old, 2.0) is new


def test_device_cap_guard_bounds_a_fast_devices_share_of_training() -> None:
    ids, ts, vals = _stream(10, 40, seed=6)
    f_ids, f_ts, f_vals = _stream(1, 400, seed=7)
    ids = ids + ["fast"] * len(f_ids)
    ts, vals = np.concatenate([ts, f_ts]), np.concatenate([vals, f_vals])
    shares = {}
    for guard in (True, False):
        learner = _learner(guard_device_cap=guard, max_device_share=0.125, batch_windows=16, guard_validation=False,
                           max_windows_per_device=4)
        learner.observe(ids, ts, vals)
        held = learner.buffer.windows_per_device()
        assert (held["fast"] <= 4) == guard
        shares[guard] = learner.learn().figures["largest_device_share"]
    assert shares[True] <= 2 / 16 < shares[False]


def test_device_median_ignores_a_minority_of_devices() -> None:
    errs = np.array([1.0] * 6 + [1000.0] * 40)
    devs = [f"c{i}" for i in range(6)] + ["attacker"] * 20 + ["other-attacker"] * 20
    assert device_median(errs, np.ones(46), devs) == 1.0
    assert np.isnan(device_median(np.zeros(0), np.zeros(0), []))


def test_rollback_hands_back_the_last_good_model_when_live_error_rises() -> None:
    ids, ts, vals = _stream(10, 200, seed=8)
    half = len(ids) // 2
    learner = _learner(rollback_min_events=200)
    good = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.observe(ids[:half], ts[:half], vals[:half])
    assert learner.check_rollback() is None  # nothing to roll back to yet
    bad = {k: v.clone() for k, v in good.items()}
    last = [k for k in bad if k.startswith("head.") and k.endswith("weight")][-1]
    bad[last] = torch.randn_like(bad[last]) * 3.0  # forecasts far off the readings
    learner.adopt(bad, "bad")
    assert learner.version == "bad"
    learner.observe(ids[half:], ts[half:], vals[half:])
    d = learner.check_rollback()
    assert d is not None and d.accepted and d.reason == "rollback" and d.version == "untrained"
    assert d.state_dict is not None and all(torch.equal(d.state_dict[k], good[k]) for k in good)
    assert d.figures["live_mse_after"] > 1.5 * d.figures["live_mse_before"]
    learner.adopt(d.state_dict, "rollback-record-7")  # the trainer may republish it under a new name
    assert learner.version == "rollback-record-7" and learner.check_rollback() is None  # nothing older to go back to
    assert learner._last_good is None
    # the guard switched off never rolls back
    off = _learner(rollback_min_events=200, guard_rollback=False)
    off.observe(ids[:half], ts[:half], vals[:half])
    off.adopt(bad, "bad")
    off.observe(ids[half:], ts[half:], vals[half:])
    assert off.check_rollback() is None


def test_live_error_is_bounded_and_waits_for_events() -> None:
    live = LiveError(max_devices=2)
    live.add(["a", "b", "c"], np.array([1.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0]))
    assert live.events == 2 and live.current() == 1.0


# ---------------------------------------------------------------------------------------------- learner
def test_learner_waits_for_enough_windows_then_learns_with_the_shared_step() -> None:
    learner = _learner(min_windows=20, max_windows_per_device=20)
    assert learner.learn().reason == "buffer_too_small"
    ids, ts, vals = _stream(8, 100, seed=9)
    stats = learner.observe(ids, ts, vals)
    assert stats.events == stats.applied == 800 and stats.windows_completed == 8 * 12
    assert learner.buffer_windows == stats.windows_kept == stats.buffer_windows > 0
    d = learner.learn()
    assert d.reason in ("accepted", "no_improvement")
    for key in ("serving_val_nll", "candidate_val_nll", "serving_val_mse", "candidate_val_mse", "drift", "steps",
                "samples", "samples_per_s", "train_loss"):
        assert np.isfinite(d.figures[key]), key
    assert d.figures["samples"] == 3 * 8 * 8  # 3 steps of 8 windows: the device cap allows 1 of 8 devices each


def test_memory_stays_bounded_on_a_long_stream() -> None:
    learner = _learner(buffer_windows=32, max_tracked_devices=6)
    sizes = []
    for seed in range(3):
        ids, ts, vals = _stream(10, 60, seed=seed)
        learner.observe(ids, ts + seed * 10**6, vals)
        sizes.append((learner.buffer_windows, learner.buffer.nbytes(), learner.assembler.nbytes(),
                      len(learner.assembler)))
    assert all(s[0] <= 32 and s[3] <= 6 for s in sizes)
    assert len({s[1] for s in sizes}) == 1 and len({s[2] for s in sizes}) == 1
    assert learner.memory_bytes >= sizes[-1][1] + sizes[-1][2]


def test_adopt_swaps_the_serving_model_and_refuses_foreign_weights() -> None:
    learner = _learner()
    other = Forecaster(n_channels=2, hidden_size=8, cell="liquid", head_units=16).state_dict()
    learner.adopt(other, "v2")
    assert learner.version == "v2" and learner.operator.model_version == "v2"
    assert learner.operator.model is learner.model
    assert all(torch.equal(learner.model.state_dict()[k], other[k]) for k in other)
    with pytest.raises(InputError, match="v3"):
        learner.adopt(Forecaster(n_channels=2, hidden_size=4, cell="liquid").state_dict(), "v3")


def test_amp_is_cpu_noop_and_masks_split_loss_from_statistics() -> None:
    assert not Trainer(_model(), amp=True).amp
    ids, ts, vals = _stream(2, 30, seed=10)
    learner = _learner(window=10)
    learner.observe(ids, ts, vals)
    used = np.flatnonzero((learner.buffer.device_code >= 0) & (learner.buffer.state["count"] > 0))
    w = learner.buffer.gather(used[:1])
    model = learner.model
    base = rollout_terms(model, w.values, w.dt, w.mask, w.state, 0.005)
    silent = rollout_terms(model, w.values, w.dt, w.mask, w.state, 0.005, torch.zeros_like(w.learn))
    assert float(silent[2].sum()) == 0 < float(base[2].sum())
    assert all(torch.equal(a, b) for a, b in zip(silent[3], base[3], strict=True))  # same state: loss mask only
    frozen = rollout_terms(model, w.values, w.dt, w.mask, w.state, 0.005, None, torch.ones_like(w.learn))
    assert torch.equal(frozen[3][2], w.state[2]) and torch.equal(frozen[3][3], w.state[3])  # statistics kept
    assert torch.equal(frozen[3][1], base[3][1]) and not torch.equal(frozen[3][0], base[3][0])


def test_learn_trains_through_the_one_shared_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    original = Trainer.train_step

    def spy(self: Trainer, values: torch.Tensor, *args: object, **kw: object) -> object:
        calls.append(tuple(values.shape))
        return original(self, values, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Trainer, "train_step", spy)
    learner = _learner(steps_per_update=4, guard_device_cap=False)
    ids, ts, vals = _stream(6, 80, seed=11)
    learner.observe(ids, ts, vals)
    learner.learn()
    assert calls == [(16, 8, 2)] * 4  # batch_windows x window x channels, every step


def test_observe_an_empty_batch() -> None:
    learner = _learner()
    stats = learner.observe([], np.zeros(0, np.int64), np.zeros((0, 2), np.float32))
    assert stats.events == stats.windows_completed == learner.buffer_windows == 0
