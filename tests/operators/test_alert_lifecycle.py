"""The alert lifecycle: every alert is reported when it opens and once when it closes, with one stable id, its
peak score and its length, whatever the batching and across a snapshot and restore taken while it is open."""

from __future__ import annotations

import numpy as np
import pytest

from liquidstream.operators import LiquidOperator
from liquidstream.operators.result import AlertClosed, StepResult
from tests.operators.conftest import BOTH_PATHS
from tests.operators.test_scoring import HIST, T0, make_op, signal

pytestmark = BOTH_PATHS


def incident(n: int = HIST + 120) -> np.ndarray:
    v = signal(n, seed=5)
    v[HIST:HIST + 40, 2] += 5.0  # channel 2 sits 5 amplitudes higher for 40 readings
    return v


def stream(op: LiquidOperator, v: np.ndarray, lo: int, hi: int, chunk: int) -> list[StepResult]:
    out = []
    for a in range(lo, hi, chunk):
        b = min(a + chunk, hi)
        out.append(op.process(["d"] * (b - a), T0 + 1000 * np.arange(a, b), v[a:b]))
    return out


def lifecycle(results: list[StepResult]) -> tuple[list[tuple[str, int]], list[AlertClosed]]:
    opened = [(a.alert_id, a.ts_ms) for r in results for a in r.alerts]
    return opened, [c for r in results for c in r.closed]


def test_an_alert_opens_and_closes_once_with_its_id_peak_and_length() -> None:
    v = incident()
    results = stream(make_op(), v, 0, len(v), len(v))
    opened, closed = lifecycle(results)
    res = results[0]
    assert len(opened) == 1 and len(closed) == 1, (opened, closed)
    (aid, open_ms), c = opened[0], closed[0]
    o, k = (open_ms - T0) // 1000, (c.ts_ms - T0) // 1000  # reading positions of the opening and the closing
    assert aid == c.alert_id == f"d@{open_ms}" and c.opened_ms == open_ms
    assert res.is_alert[o:k].all() and not res.is_alert[k], "closed on the first reading with no alert open"
    assert k > HIST + 40 and c.readings == k - o + 1 and c.duration_ms == 1000 * (k - o)
    assert c.peak_score == pytest.approx(float(np.nanmax(res.score[o:k + 1])), rel=1e-6)
    assert c.reason == res.alerts[0].reason and not c.max_duration and c.index == k
    assert c.severity == ("critical" if c.peak_score >= 2 * c.threshold else "warning")


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_the_lifecycle_does_not_depend_on_batching(chunk: int) -> None:
    v = incident()
    whole = lifecycle(stream(make_op(), v, 0, len(v), len(v)))
    parts = lifecycle(stream(make_op(), v, 0, len(v), chunk))
    assert parts[0] == whole[0]
    assert [(c.alert_id, c.ts_ms, c.readings) for c in parts[1]] == [(c.alert_id, c.ts_ms, c.readings)
                                                                     for c in whole[1]]
    for a, b in zip(parts[1], whole[1], strict=True):
        assert a.peak_score == pytest.approx(b.peak_score, rel=1e-5)


def test_a_restore_in_the_middle_of_an_alert_closes_it_once_with_the_same_id() -> None:
    v = incident()
    reference = lifecycle(stream(make_op(), v, 0, len(v), 16))
    first = make_op()
    before = lifecycle(stream(first, v, 0, HIST + 20, 16))  # the alert is open at the cut
    assert len(before[0]) == 1 and before[1] == []
    second = make_op()
    second.store.restore(first.store.snapshot())
    after = lifecycle(stream(second, v, HIST + 20, len(v), 16))
    assert after[0] == [] and len(after[1]) == 1
    assert after[1][0].alert_id == reference[1][0].alert_id == before[0][0][0]
    assert after[1][0].readings == reference[1][0].readings
    assert after[1][0].peak_score == pytest.approx(reference[1][0].peak_score, rel=1e-5)


def test_an_alert_that_reaches_its_maximum_length_says_so() -> None:
    v = signal(HIST + 40, seed=7)
    v[HIST:, 0] = 0.0  # stuck for good
    op = make_op(level_rule=True, model_triggers=False, stuck_after=4, max_alert_events=10, cooldown_events=5)
    _, closed = lifecycle(stream(op, v, 0, len(v), len(v)))
    assert closed and all(c.max_duration and c.readings == 11 for c in closed)
    assert closed[0].opened_ms == T0 + 1000 * (HIST + 4) and closed[0].reason == "stuck_sensor"


def test_an_alert_open_when_its_device_is_evicted_closes_as_evicted_at_its_last_reading() -> None:
    v = incident()
    op = make_op()
    opened, _ = lifecycle(stream(op, v, 0, HIST + 10, 50))  # stop 10 readings into the incident: still open
    assert len(opened) == 1
    aid, open_ms = opened[0]
    before = op.store.snapshot(["d"])
    (c,) = op.open_alerts(["d", "never-seen"])
    assert op.store.snapshot(["d"]) == before  # a query: no state changes
    assert (c.alert_id, c.opened_ms, c.closed_by, c.index) == (aid, open_ms, "evicted", -1)
    assert c.ts_ms == T0 + 1000 * (HIST + 9)  # the device's last reading
    assert c.readings == (c.ts_ms - open_ms) // 1000 + 1 and c.peak_score >= c.threshold
    _, closed = lifecycle(stream(op, v, HIST + 10, len(v), 50))  # had it not been evicted: the same alert closes
    assert [x.alert_id for x in closed] == [aid] and op.open_alerts(["d"]) == []
