"""The smoothed level rule's extra device state travels through the changelog layout (split / merge)."""

from __future__ import annotations

import numpy as np

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.smoothed_level import LEVEL_FIELDS
from liquidstream.operators.state.store import DeviceStateStore
from liquidstream.pipeline.kafka.changelog import StateLayout

DEVICES = ["a", "b", "c"]


def test_changelog_round_trip_keeps_the_smoothed_level_state() -> None:
    settings = OperatorSettings(level_smoothing=0.2, rebase_on_close=True, reference_events=4)
    op = LiquidOperator(Forecaster(n_channels=3, hidden_size=6, cell="cfc"), settings)
    rng = np.random.default_rng(2)
    ids = [d for _ in range(8) for d in DEVICES]
    op.process(ids, 1_700_000_000_000 + 1000 * np.arange(len(ids)), rng.normal(size=(len(ids), 3)).astype(np.float32))
    store = op.store
    assert float(store.tensors["level_var"].abs().sum()) > 0, "the option's state was written"
    layout = StateLayout(store)
    assert layout.row_bytes == StateLayout(DeviceStateStore(6, 3)).row_bytes + 2 * 3 * 4
    fresh = DeviceStateStore(6, 3, extra_fields=LEVEL_FIELDS)
    assert fresh.restore(layout.merge(dict(layout.split(store.snapshot(DEVICES))))) == DEVICES
    assert fresh.snapshot(DEVICES) == store.snapshot(DEVICES)
