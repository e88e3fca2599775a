"""``liquidstream evaluate skab`` on tiny fixtures in SKAB's format: the protocol, the metrics, no look-ahead,
the peers and the JSON last line (the real data stays in ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.pipeline.cli.entry import main
from liquidstream.pipeline.eval.detection import Device, Streamed, stream
from liquidstream.pipeline.eval.peers import hst_flags, rolling_z_flags
from liquidstream.pipeline.eval.skab import CHANNELS, TRAIN_ROWS, load_skab, point_scores
from liquidstream.pipeline.eval.skab_eval import devices_of
from tests.pipeline.eval.test_skab import _write_experiment


def test_point_scores_match_hand_count_over_files() -> None:
    truth = [np.array([0, 0, 1, 1, 1], bool), np.array([1, 0, 0], bool)]
    pred = [np.array([1, 0, 1, 0, 1], bool), np.array([1, 1, 0], bool)]
    s = point_scores(truth, pred)
    tp, fp, fn, tn = 3, 2, 1, 2  # counted by hand over both files together
    assert s.f1 == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s.far == pytest.approx(100 * fp / (fp + tn)) and s.mar == pytest.approx(100 * fn / (fn + tp))


def test_training_part_is_each_devices_commissioning(tmp_path: Path) -> None:
    _write_experiment(tmp_path / "a.csv", rows=TRAIN_ROWS + 37, anomaly=(410, 420), seed=0)
    _write_experiment(tmp_path / "b.csv", rows=TRAIN_ROWS + 5, anomaly=(401, 403), seed=1)
    exps = load_skab(tmp_path)
    assert [len(e.ts_ms) - TRAIN_ROWS for e in exps] == [37, 5]
    assert int(exps[0].anomaly[:TRAIN_ROWS].sum()) == 0 and int(exps[0].anomaly[TRAIN_ROWS:].sum()) == 10
    assert [d.commissioning for d in devices_of(exps)] == [TRAIN_ROWS, TRAIN_ROWS]


def _device(name: str, values: np.ndarray, commissioning: int = 40) -> Device:
    n = len(values)
    ts = 1_583_748_873_000 + 1000 * np.cumsum(1 + (np.arange(n) % 9 == 0))  # 1 s gaps, some skipped seconds
    return Device(name, ts.astype(np.int64), values.astype(np.float32), commissioning)


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_streaming_has_no_look_ahead(chunk: int) -> None:
    rng = np.random.default_rng(0)
    base = 1.0 + 0.05 * rng.standard_normal((160, len(CHANNELS)))
    base[90:110] += 3.0
    other = base.copy()
    other[125:] += 50.0  # a different future must not change any earlier output
    model = Forecaster(n_channels=len(CHANNELS), hidden_size=8, cell="cfc")

    def run(values: np.ndarray) -> Streamed:
        op = LiquidOperator(model, OperatorSettings())
        op.set_commissioning(["x", "y"], [40, 40])
        return stream(op, [_device("x", values), _device("y", base[:60])], chunk=chunk)

    a, b = run(base), run(other)
    assert np.array_equal(a.anomaly_score[0][:125], b.anomaly_score[0][:125], equal_nan=True)
    assert np.array_equal(a.is_alert[0][:125], b.is_alert[0][:125]) and a.is_alert[0][90:110].any()
    assert not a.is_alert[0][:40].any(), "no alert during commissioning"
    assert not np.array_equal(a.anomaly_score[0], b.anomaly_score[0], equal_nan=True)
    assert np.array_equal(a.anomaly_score[1], b.anomaly_score[1], equal_nan=True)


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
    assert {"f1", "far", "mar", "mse_model", "mse_persistence"} <= set(last) and last["test_points"] == 160
    assert set(last["ablations"]) == {"full", "rules_only", "model_only", "persistence", "gru"}
    assert last["ablations"]["full"]["f1"] == last["f1"]
    assert main(["evaluate", "skab"]) == 2  # --data-dir is required for skab
