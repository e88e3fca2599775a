"""The irregular-sampling study's parts on tiny inputs: real data shipped offline, thinning, gap-blind
sequences, the GRU baseline, and the peers' ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster
from liquidstream.operators.training import MIN_HISTORY, Sequences, Trainer
from liquidstream.pipeline.eval.irregular.bins import GAP_EDGES_S, bin_labels, gap_metrics
from liquidstream.pipeline.eval.irregular.data import (
    co2,
    co2_path,
    co2_streams,
    elnino,
    make_irregular,
    smooth_sines,
    water_flow,
    water_flow_path,
    water_flow_streams,
)
from liquidstream.pipeline.eval.irregular.models import GRUGapCell, build_model, fix_spread, gap_blind
from liquidstream.pipeline.eval.irregular.peers import evaluate_peers, truth_flags
from liquidstream.pipeline.eval.irregular.reference import window_reference
from liquidstream.pipeline.eval.irregular.study import MODELS, evaluate_irregular, run_model, streams
from liquidstream.pipeline.offline.simulator import Incident
from liquidstream.pipeline.settings import Settings


def test_water_flow_is_the_recording_shipped_in_the_river_wheel() -> None:
    path = water_flow_path()
    assert "site-packages" in str(path) or "river" in str(path.parent)
    ts, v = water_flow()
    assert v.shape == (1268, 1) and v.dtype == np.float32
    assert np.diff(ts).min() >= 1000 and np.median(np.diff(ts)) == 1000  # hourly, rescaled to 1 s


def test_co2_is_the_recording_shipped_in_the_statsmodels_wheel_with_its_missing_weeks() -> None:
    path = co2_path()
    assert path.name == "co2.csv" and path.parent.parent.name == "datasets"
    ts, v = co2()
    assert v.dtype == np.float32 and v.shape == (len(ts), 1) and 2000 < len(ts) < 2284  # blank weeks dropped
    gaps = np.diff(ts)
    assert np.median(gaps) == 1000 and gaps.min() == 1000  # weekly, rescaled to 1 s
    assert (gaps > 1000).sum() >= 10  # the station's own missing weeks stay real gaps
    assert 310.0 < v[:52].mean() < 320.0 and 365.0 < v[-52:].mean() < 375.0  # ppm, 1958 and 2001


def test_co2_parses_a_tiny_csv_and_skips_blank_weeks(tmp_path: Path) -> None:
    f = tmp_path / "co2.csv"
    f.write_text("date,co2\n19580329,316.1\n19580405,\n19580412,317.6\n19580419,317.5\n")
    ts, v = co2(f)
    assert ts.tolist() == [0, 2000, 3000] and v[:, 0].tolist() == pytest.approx([316.1, 317.6, 317.5])


def test_elnino_reads_the_yearly_rows_as_one_monthly_series(tmp_path: Path) -> None:
    f = tmp_path / "elnino.csv"
    f.write_text('"YEAR","JAN","FEB","MAR","APR","MAY","JUN","JUL","AUG","SEP","OCT","NOV","DEC"\n'
                 + "".join(f"{y}," + ",".join(f"{y - 1950}.{m:02d}" for m in range(1, 13)) + "\n"
                           for y in (1950, 1951)))
    ts, v = elnino(f)
    assert ts.tolist() == [1000 * k for k in range(24)]  # 1 month -> 1 s
    assert v[:, 0].tolist() == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.11,
                                              0.12, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.09, 1.10,
                                              1.11, 1.12])
    ts, v = elnino()  # the recording shipped inside the statsmodels wheel: 1950-2010
    assert v.shape == (732, 1) and 15.0 < float(v.min()) < float(v.max()) < 32.0  # deg C


def test_co2_streams_keep_real_readings_at_their_real_times() -> None:
    ts, v = co2()
    at = dict(zip(ts.tolist(), v[:, 0].tolist(), strict=True))
    (tr_ids, tr_ts, tr_v), (te_ids, te_ts, te_v) = co2_streams(seed=0)
    assert tr_ts.max() < te_ts.min() and len(set(tr_ids)) > 16 and len(set(te_ids)) > 16
    for t_, x in zip(np.concatenate([tr_ts, te_ts]).tolist(), np.concatenate([tr_v, te_v])[:, 0].tolist(),
                     strict=True):
        assert at[t_] == x
    one = np.array(tr_ids) == tr_ids[0]
    assert len(set(np.diff(tr_ts[one]).tolist())) > 2  # thinned: bursts and dropouts of several weeks
    assert co2_streams(seed=1)[0][1].tolist() != tr_ts.tolist()  # the thinning depends on the seed


@torch.no_grad()
def test_study_ltc_starts_with_time_constants_on_the_streams_scale() -> None:
    torch.manual_seed(0)
    x, h = torch.randn(16, 2) * 0.5, torch.zeros(16, 8)
    for name, lo, hi in (("default", 0.0, 0.5), ("study", 0.5, 20.0)):
        model = build_model("ltc", 1, 8) if name == "study" else Forecaster(1, 8, cell="ltc")
        tau = model.cell.time_constants(x, h)
        assert lo < float(tau.median()) < hi, name
    study = build_model("ltc", 1, 8)
    h1, h5 = (study.cell(x, h, torch.full((16,), g)) for g in (1.0, 5.0))
    assert float((h5 - h1).abs().mean()) > 0.1 * float(h5.abs().mean())  # the gap still moves the state


def test_make_irregular_keeps_real_readings_with_bursts_and_dropouts() -> None:
    ts = np.arange(500) * 1000
    v = np.arange(500, dtype=np.float32)[:, None] * 2.0
    ids, t2, v2 = make_irregular("d", ts, v, np.random.default_rng(3))
    assert len(ids) == len(t2) == len(v2) and set(ids) == {"d"}
    assert np.array_equal(v2[:, 0], 2.0 * (t2 // 1000))  # every kept reading is the original at its time
    gaps = set(np.diff(t2).tolist())
    assert 1000 in gaps and max(gaps) >= 4000  # dense runs and sparse runs


def test_water_flow_train_and_test_do_not_overlap() -> None:
    (tr_ids, tr_ts, _), (te_ids, te_ts, _) = water_flow_streams(seed=0)
    assert tr_ts.max() < te_ts.min()
    assert len(set(tr_ids)) > 8 and len(set(te_ids)) > 8


def test_simulator_training_devices_grow_while_the_held_out_devices_stay() -> None:
    small_train, small_test = streams("simulator", seed=0, sim_train_devices=4)
    big_train, big_test = streams("simulator", seed=0, sim_train_devices=12)
    assert small_train.values.shape[0] == 4 and big_train.values.shape[0] == 12
    assert torch.equal(small_test.values, big_test.values)  # the same 32 held-out devices
    with pytest.raises(Exception, match="sim_train_devices must be >= 1"):
        evaluate_irregular(Settings(), sim_train_devices=0, stream_names=("simulator",))


def test_gap_blind_replaces_gaps_only() -> None:
    s = Sequences.from_columns(["a", "a", "a", "b"], np.array([0, 500, 4000, 0]), np.ones((4, 1), np.float32))
    b = gap_blind(s)
    assert s.dt.tolist() == [[0.0, 0.5, 3.5], [0.0, 0.0, 0.0]]
    assert b.dt.tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert torch.equal(b.values, s.values) and torch.equal(b.mask, s.mask)


def test_every_model_trains_through_the_production_trainer() -> None:
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.2, 3.0, 30))
    ids = ["a"] * 30 + ["b"] * 30
    ts = np.concatenate([t, t]) * 1000
    vals = np.concatenate([np.sin(t), np.cos(t)])[:, None].astype(np.float32)
    seqs = Sequences.from_columns(ids, ts.astype(np.int64), vals)
    for name in (*MODELS, "persistence"):
        r = run_model(name, seqs, seqs, epochs=1, hidden_size=4, seed=0, device="cpu")
        assert np.isfinite(r["mse"]) and np.isfinite(r["nll"]), name
    gru = build_model("gru", 1, 4)
    assert isinstance(gru.cell, GRUGapCell)
    h = gru.cell(torch.zeros(2, 2), torch.zeros(2, 4), torch.tensor([1.0, 9.0]))
    assert h.shape == (2, 4)
    before = Trainer(gru).evaluate(seqs)["nll"]
    Trainer(gru, window=8, lr=1e-2).fit(seqs, 3)
    assert Trainer(gru).evaluate(seqs)["nll"] < before  # the GRU baseline really learns


def test_truth_flags_and_tiny_peer_run() -> None:
    inc = (Incident("a", "spike", 1000, 1000, (0,)),)
    assert truth_flags(np.array(["a", "a"]), np.array([1000, 2000]), inc).tolist() == [True, False]
    report = evaluate_peers(Settings(), epochs=1, hidden_size=8, devices=3, duration_s=500.0, prefix_s=200.0,
                            anomaly_rate=20.0)
    assert report["anomalous_points"] > 0 and report["test_points"] > report["anomalous_points"]
    assert set(report["results"]) == {"liquidstream (cfc, operator defaults)", "River HalfSpaceTrees (q=0.99)",
                                      "River HalfSpaceTrees (q=0.95)", "rolling z-score (300 readings)"}
    for r in report["results"].values():
        assert 0.0 <= r["f1"] <= 1.0 and r["points"] == report["test_points"]


def _tiny_sines() -> Sequences:
    return Sequences.from_columns(*smooth_sines(seed=0, devices=4, duration_s=90.0))


def test_gap_metrics_equal_trainer_evaluate_and_bin_by_the_true_gap() -> None:
    seqs = _tiny_sines()
    trainer = Trainer(build_model("cfc", 1, 8), window=8)
    trainer.fit(seqs, 1)
    overall = trainer.evaluate(seqs)
    got = gap_metrics(trainer, seqs, seqs.dt)
    assert np.isclose(got["mse"], overall["mse"], rtol=1e-5) and np.isclose(got["nll"], overall["nll"], rtol=1e-5)
    n_by_gap, mse_by_gap = got["n_by_gap"], got["mse_by_gap"]
    assert isinstance(n_by_gap, dict) and isinstance(mse_by_gap, dict)
    per_reading = sum(n_by_gap[b] * mse_by_gap[b] for b in n_by_gap) / sum(n_by_gap.values())
    assert np.isclose(per_reading, got["mse"], rtol=1e-5)
    # expected bin counts by hand: scored readings (the first MIN_HISTORY of a device only warm up) by true gap
    scored = seqs.mask.clone()
    scored[:, :MIN_HISTORY] = False
    gaps = seqs.dt[scored].numpy()
    assert n_by_gap == {b: int(c) for b, c in zip(bin_labels(), np.bincount(np.digitize(gaps, GAP_EDGES_S),
                                                                                minlength=5), strict=True) if c}
    blind = gap_metrics(trainer, gap_blind(seqs), seqs.dt)  # gap-blind input, still binned by the true gap
    assert blind["n_by_gap"] == n_by_gap


def test_mse_objective_trains_the_mean_and_keeps_the_spread() -> None:
    seqs = _tiny_sines()
    r = run_model("cfc", seqs, seqs, epochs=2, hidden_size=8, seed=0, device="cpu", objective="mse")
    assert np.isfinite(r["mse"])
    model = fix_spread(build_model("cfc", 1, 8))
    Trainer(model, window=8, lr=1e-2).fit(seqs, 2)
    last = model.head[-1]
    assert isinstance(last, torch.nn.Linear)
    w, b = last.weight.detach(), last.bias.detach()
    assert float(w[:1].abs().sum()) > 0  # the mean rows learned
    assert float(w[1:].abs().sum()) == 0 and float(b[1:].abs().sum()) == 0  # the spread rows never moved


def test_smooth_sines_are_irregular_and_smooth() -> None:
    ids, ts, v = smooth_sines(seed=1, devices=3, duration_s=300.0)
    assert set(ids) == {"sine-0", "sine-1", "sine-2"} and v.shape == (len(ts), 1)
    gaps = np.diff(ts[np.array(ids) == "sine-0"]) / 1000.0
    assert gaps.min() >= 0 and 2.0 < gaps.mean() < 4.5 and gaps.std() > 1.0  # exponential, mean 3 s
    assert np.abs(v).max() < 2.0


def test_the_reference_scores_the_cells_readings_and_uses_the_true_times() -> None:
    train = Sequences.from_columns(*smooth_sines(5, 24, 300.0))
    test = Sequences.from_columns(*smooth_sines(6, 8, 300.0))
    ref = window_reference(train, test, epochs=15)
    persistence = run_model("persistence", train, test, epochs=0, hidden_size=8, seed=0, device="cpu")
    # the same readings, the same normalisation: persistence's error is the study's to float rounding
    assert ref["persistence_mse"] == pytest.approx(persistence["mse"], rel=1e-5)
    assert ref["readings"] == sum(persistence["n_by_gap"].values())
    # on the control the gap matters by construction: the true ages must beat 1 s steps
    assert ref["mse"] < ref["blind_mse"] < ref["persistence_mse"]
    assert ref["gain_pct"] == pytest.approx(100 * (ref["blind_mse"] - ref["mse"]) / ref["blind_mse"])
