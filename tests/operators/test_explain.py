"""Alerts explain themselves: per blamed channel the reading, the value expected at that instant and its spread,
the standardised deviation; and the cell's time constants then."""

from __future__ import annotations

import numpy as np
import pytest

from liquidstream.operators.result import Alert
from tests.operators.test_alert_lifecycle import incident, stream
from tests.operators.test_scoring import HIST, T0, make_op


def opening(v: np.ndarray) -> Alert:
    (alert,) = [a for r in stream(make_op(), v, 0, len(v), 37) for a in r.alerts]
    return alert


def test_an_opened_alert_names_its_channels_readings_expectations_and_time_constants() -> None:
    v = incident()  # channel 2 sits 5 amplitudes higher for 40 readings
    alert = opening(v)
    why = alert.explanation
    assert why is not None and [c.channel for c in why.channels] == list(alert.channels)
    top, pos = why.channels[0], (alert.ts_ms - T0) // 1000
    assert top.channel == 2 and top.reading == pytest.approx(float(v[pos, 2]), rel=1e-3)
    assert top.z >= 3 and abs(top.reading - top.expected) > 3 * top.spread > 0  # far outside what was expected
    lo, mid, hi = why.time_constants_s
    assert 0 < lo <= mid <= hi < float("inf")


def test_z_is_the_deviation_from_the_expected_value_in_spreads() -> None:
    why = opening(incident()).explanation
    assert why is not None
    for c in why.channels:
        assert c.z == pytest.approx(abs(c.reading - c.expected) / c.spread, rel=5e-3, abs=5e-3)


def test_without_an_absolute_head_the_expected_value_is_the_forecast_at_that_instant() -> None:
    import torch

    from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings

    def op() -> LiquidOperator:
        torch.manual_seed(0)
        model = Forecaster(n_channels=4, hidden_size=8, cell="cfc", head_units=16, absolute_head=False)
        return LiquidOperator(model, OperatorSettings(warmup_events=20))

    v = incident()
    v[HIST:HIST + 40, 2] += 15.0  # a jump the delta head alone cannot miss
    (alert, *_) = [a for r in stream(op(), v, 0, len(v), 37) for a in r.alerts]
    pos = (alert.ts_ms - T0) // 1000
    again_op = op()
    stream(again_op, v, 0, pos, 37)  # the same readings, batched the same way, up to the opening one
    fc = again_op.forecast_at(["d"], np.array([alert.ts_ms]))  # what a reading at that instant is scored against
    (again,) = again_op.process(["d"], np.array([alert.ts_ms]), v[pos:pos + 1]).alerts
    assert again.explanation is not None
    expected = [c.expected for c in again.explanation.channels]
    np.testing.assert_allclose(expected, fc.forecast[0, list(again.channels)], rtol=1e-3)
