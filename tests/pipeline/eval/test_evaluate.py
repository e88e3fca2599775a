"""``liquidstream evaluate skab`` on tiny fixtures in SKAB's format: the protocol, the metrics, no look-ahead,
the peers and the JSON last line (the real data stays in ../shared)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.pipeline.cli.entry import main
from liquidstream.pipeline.eval.peers import hst_flags, rolling_z_flags
from liquidstream.pipeline.eval.skab import CHANNELS, TRAIN_ROWS, Experiment, load_skab, point_scores
from liquidstream.pipeline.eval.skab_eval import SKAB_PROFILE, skab_settings, stream_alerts
from tests.pipeline.eval.test_skab import _write_experiment


def test_point_scores_match_hand_count_over_files() -> None:
    truth = [np.array([0, 0, 1, 1, 1], bool), np.array([1, 0, 0], bool)]
    pred = [np.array([1, 0, 1, 0, 1], bool), np.array([1, 1, 0], bool)]
    s = point_scores(truth, pred)
    tp, fp, fn, tn = 3, 2, 1, 2  # counted by hand over both files together
    assert s.f1 == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s.far == pytest.approx(100 * fp / (fp + tn)) and s.mar == pytest.approx(100 * fn / (fn + tp))


def test_training_part_split_and_profile(tmp_path: Path) -> None:
    _write_experiment(tmp_path / "a.csv", rows=TRAIN_ROWS + 37, anomaly=(410, 420), seed=0)
    _write_experiment(tmp_path / "b.csv", rows=TRAIN_ROWS + 5, anomaly=(401, 403), seed=1)
    exps = load_skab(tmp_path)
    assert [len(e.ts_ms) - TRAIN_ROWS for e in exps] == [37, 5]
    assert int(exps[0].anomaly[:TRAIN_ROWS].sum()) == 0 and int(exps[0].anomaly[TRAIN_ROWS:].sum()) == 10
    s = skab_settings(OperatorSettings())
    assert s.reference_events == TRAIN_ROWS and all(getattr(s, k) == v for k, v in SKAB_PROFILE.items())


def _exp(name: str, values: np.ndarray) -> Experiment:
    n = len(values)
    ts = 1_583_748_873_000 + 1000 * np.cumsum(1 + (np.arange(n) % 9 == 0))  # 1 s gaps, some skipped seconds
    return Experiment(name, ts.astype(np.int64), values.astype(np.float32), np.zeros(n, bool))


@pytest.mark.parametrize("profile", ["plain", "skab"])
def test_streaming_has_no_look_ahead(profile: str) -> None:
    rng = np.random.default_rng(0)
    base = 1.0 + 0.05 * rng.standard_normal((120, len(CHANNELS)))
    base[70:90] += 3.0
    other = base.copy()
    other[95:] += 50.0  # a different future must not change any earlier decision
    model = Forecaster(n_channels=len(CHANNELS), hidden_size=8, cell="cfc")
    settings = OperatorSettings(reference_events=40, level_sigma=4.0, hold_sigma=3.0)
    if profile == "skab":  # the SKAB profile (smoothed level, re-basing) with a reference that fits the fixture
        settings = dataclasses.replace(skab_settings(settings), reference_events=40)
    a = stream_alerts(LiquidOperator(model, settings), [_exp("x", base), _exp("y", base[:60])])
    b = stream_alerts(LiquidOperator(model, settings), [_exp("x", other), _exp("y", base[:60])])
    assert np.array_equal(a[0][:95], b[0][:95]) and a[0][70:90].all()
    assert not np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_peers_flag_a_level_shift_after_training() -> None:
    rng = np.random.default_rng(1)
    v = 1.0 + 0.05 * rng.standard_normal((TRAIN_ROWS + 200, 3))
    v[TRAIN_ROWS + 100:] += 2.0
    for flags in (hst_flags(v, TRAIN_ROWS, quantile=0.99), rolling_z_flags(v, TRAIN_ROWS, window=300)):
        assert flags.shape == (200,)
        assert flags[:100].mean() < 0.1 and flags[100:110].mean() > 0.5


def test_cli_json_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for k in range(2):
        _write_experiment(tmp_path / "valve1" / f"{k}.csv", rows=TRAIN_ROWS + 80, anomaly=(440, 470), seed=k)
    assert main(["evaluate", "skab", "--data-dir", str(tmp_path), "--json", "--epochs", "1", "--hidden-size", "8",
                 "--no-peers", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "Conv-AE" in "\n".join(lines[:-1])
    last = json.loads(lines[-1])
    assert {"f1", "far", "mar"} <= set(last) and last["test_points"] == 160
    assert last["operator"]["reference_events"] == TRAIN_ROWS
    assert main(["evaluate", "skab"]) == 2  # --data-dir is required for skab
