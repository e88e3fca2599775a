"""Silence alerts: a device quiet for many of its usual gaps opens one, its next reading closes it, with one id
whoever noticed it (a stream-time check or the reading itself), across batching and a snapshot and restore."""

from __future__ import annotations

import numpy as np
import pytest

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.silence import MIN_GAPS

T0 = 1_767_225_600_000


def make_op(after: float = 10.0) -> LiquidOperator:
    return LiquidOperator(Forecaster(n_channels=1, hidden_size=4), OperatorSettings(silence_after_gaps=after))


def rhythm(n: int, seed: int, start: int = T0) -> np.ndarray:
    """Event times, ms: gaps of 1-2 s."""
    return start + np.cumsum(np.random.default_rng(seed).integers(1000, 2000, n))


def events(op: LiquidOperator, ids: list[str], ts: np.ndarray, chunk: int, check: bool) -> list[tuple[str, str, int]]:
    """(event, alert id, ts) of every silence record, feeding ``chunk`` readings at a time and, with ``check``,
    checking stream time after each batch as the replay does."""
    out = []
    for lo in range(0, len(ids), chunk):
        res = op.process(ids[lo:lo + chunk], ts[lo:lo + chunk], np.zeros((len(ids[lo:lo + chunk]), 1), np.float32))
        out += [("opened", a.alert_id, a.ts_ms) for a in res.alerts if a.reason == "silence"]
        out += [("closed", c.alert_id, c.ts_ms) for c in res.closed if c.reason == "silence"]
        if check:
            out += [("opened", a.alert_id, a.ts_ms) for a in op.check_silence(int(ts[lo:lo + chunk].max()))]
    return sorted(out, key=lambda e: (e[1], e[0] == "closed"))


def fleet() -> tuple[list[str], np.ndarray]:
    """Device q reads steadily; p reads, falls silent for 5 minutes while q goes on, then reads again."""
    p = np.concatenate([rhythm(40, 1), rhythm(20, 2, start=int(rhythm(40, 1)[-1]) + 300_000)])
    q = rhythm(300, 3)
    ids = np.array(["p"] * len(p) + ["q"] * len(q))
    ts = np.concatenate([p, q])
    order = np.argsort(ts, kind="stable")
    return ids[order].tolist(), ts[order]


def test_a_silence_opens_once_and_closes_with_the_next_reading_whatever_the_batching() -> None:
    ids, ts = fleet()
    whole = events(make_op(), ids, ts, len(ids), check=False)  # nobody checks: the reading ends it
    assert [e[0] for e in whole] == ["opened", "closed"] and whole[0][1] == whole[1][1]
    last_p = max(t for d, t in zip(ids, ts.tolist(), strict=True) if d == "p" and t < whole[1][2])
    assert whole[0][1].startswith("p@") and last_p < whole[0][2] < last_p + 300_000
    checked = events(make_op(), ids, ts, len(ids), check=True)
    assert checked[:2] == whole and [e[0] for e in checked[2:]] == ["opened"]  # p falls silent again at the end
    for chunk in (1, 7, 50):
        assert events(make_op(), ids, ts, chunk, check=True) == checked, chunk  # noticed by a check: same ids


def test_the_check_opens_at_the_silence_start_and_the_record_says_how_long() -> None:
    op = make_op()
    ts = T0 + 1000 * np.arange(MIN_GAPS + 1)  # gaps of exactly 1 s: usual gap 1 s
    op.process(["d"] * len(ts), ts, np.zeros((len(ts), 1), np.float32))
    assert op.check_silence(int(ts[-1]) + 9_999) == []
    (a,) = op.check_silence(int(ts[-1]) + 25_000)
    assert (a.ts_ms, a.score, a.threshold, a.severity, a.channels, a.index) == (int(ts[-1]) + 10_000, 25.0, 10.0,
                                                                                "critical", (), -1)
    assert op.check_silence(int(ts[-1]) + 90_000) == []  # open: once
    res = op.process(["d"], np.array([int(ts[-1]) + 40_000]), np.zeros((1, 1), np.float32))
    (c,) = res.closed
    assert (c.alert_id, c.closed_by, c.peak_score, c.readings, c.index) == (a.alert_id, "resumed", 40.0, 1, 0)
    assert res.alerts == []  # opened by the check already


def test_no_silence_before_the_rhythm_is_learnt_nor_when_off() -> None:
    ts = T0 + 1000 * np.arange(MIN_GAPS)  # MIN_GAPS readings: one gap short
    for op in (make_op(), make_op(after=0.0)):
        op.process(["d"] * len(ts), ts, np.zeros((len(ts), 1), np.float32))
        assert op.check_silence(int(ts[-1]) + 10**9) == []


def test_a_silence_does_not_teach_the_rhythm_and_survives_a_restore() -> None:
    ids, ts = fleet()
    p40 = [t for d, t in zip(ids, ts.tolist(), strict=True) if d == "p"][39]
    cut = int(np.searchsorted(ts, p40 + 60_000))  # a minute into p's silence: q has moved on
    op = make_op()
    op.process(ids[:cut], ts[:cut], np.zeros((cut, 1), np.float32))
    (a,) = op.check_silence(int(ts[cut - 1]))
    usual = op.silence.usual_gap_s(op.store.lookup(["p"]))  # type: ignore[union-attr]
    blob = op.store.snapshot()
    other = make_op()
    other.store.restore(blob)
    res = other.process(ids[cut:], ts[cut:], np.zeros((len(ids) - cut, 1), np.float32))
    assert [(c.alert_id, c.closed_by) for c in res.closed if c.reason == "silence"] == [(a.alert_id, "resumed")]
    assert not [x for x in res.alerts if x.reason == "silence"]
    after = other.silence.usual_gap_s(other.store.lookup(["p"]))  # type: ignore[union-attr]
    assert after == pytest.approx(usual, rel=0.3)  # the 5-minute gap did not become usual
