"""The NAB scorer (liquidstream.pipeline.eval.nab_scoring): hand-made rule checks, and the reproduction of NAB's
published results from the two published detectors' per-row outputs (the data stays in ../shared/data/nab)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from liquidstream.pipeline.eval import nab_scoring as nab

DATA_DIR = Path(os.environ.get("NAB_DATA_DIR", Path(__file__).resolve().parents[3].parent / "shared" / "data" / "nab"))
STD = nab.PROFILES["standard"]
DETECTORS = ("numenta", "windowedGaussian")


def make_file(n: int, windows: list[tuple[int, int]], probation: int = 0) -> nab.NabFile:
    ts = np.arange(n, dtype=np.int64) * 60_000
    return nab.NabFile("toy/toy.csv", ts, np.zeros(n), windows, probation)


def score_rows(f: nab.NabFile, rows: list[int], costs: nab.Costs = STD) -> float:
    det = np.zeros(len(f.timestamps), dtype=bool)
    det[rows] = True
    return nab.score_detections([f], {f.name: det}, costs)


def sig(x: float) -> float:
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


# ---------------------------------------------------------------- rules on hand-made files

def test_probation_rows() -> None:
    assert nab.probation_rows(100) == 15
    assert nab.probation_rows(4032) == 604
    assert nab.probation_rows(5000) == 750
    assert nab.probation_rows(22695) == 750


def test_detection_at_window_start_earns_tp_weight() -> None:
    f = make_file(200, [(100, 109)])
    assert score_rows(f, [100]) == pytest.approx(1.0)
    assert score_rows(f, [100], nab.Costs(tp=2.5, fn=1.0, fp=0.11)) == pytest.approx(2.5)


def test_later_detection_in_window_earns_less() -> None:
    f = make_file(200, [(100, 109)])
    # last row: x = -1 / width
    assert score_rows(f, [109]) == pytest.approx(sig(-1 / 10) / sig(-1.0))
    assert 0 < score_rows(f, [109]) < score_rows(f, [105]) < score_rows(f, [100])


def test_missed_window_costs_fn_weight() -> None:
    f = make_file(200, [(100, 109), (150, 159)])
    assert score_rows(f, []) == pytest.approx(-2.0)
    assert score_rows(f, [], nab.PROFILES["reward_low_FN_rate"]) == pytest.approx(-4.0)
    assert score_rows(f, [150]) == pytest.approx(0.0)  # one hit (+1), one miss (-1)


def test_fp_far_from_window_costs_fp_weight() -> None:
    f = make_file(300, [(100, 109)])
    assert score_rows(f, [50]) == pytest.approx(-0.11 - 1.0)  # before any window, + missed window
    assert score_rows(f, [250], nab.PROFILES["reward_low_FP_rate"]) == pytest.approx(-0.22 - 1.0)  # y > 3, + miss
    assert score_rows(f, [100, 250]) == pytest.approx(1.0 - 0.11)


def test_only_first_detection_in_window_counts() -> None:
    f = make_file(200, [(100, 109)])
    assert score_rows(f, [103, 104, 105, 109]) == pytest.approx(score_rows(f, [103]))
    assert score_rows(f, list(range(100, 110))) == pytest.approx(1.0)


def test_fp_just_after_window_costs_less_than_far_away() -> None:
    f = make_file(300, [(100, 109)])
    near = score_rows(f, [100, 110]) - 1.0
    mid = score_rows(f, [100, 118]) - 1.0
    far = score_rows(f, [100, 290]) - 1.0
    assert -0.11 < near < 0 and far == pytest.approx(-0.11)
    assert near > mid > far
    # y = (i - right) / (width - 1)
    assert near == pytest.approx(0.11 * sig(1 / 9))
    assert mid == pytest.approx(0.11 * sig(9 / 9))


def test_probation_rows_never_scored() -> None:
    f = make_file(200, [(100, 109)], probation=30)
    assert score_rows(f, [0, 5, 29]) == pytest.approx(-1.0)  # no FP cost, window still missed
    assert score_rows(f, [29, 100]) == pytest.approx(1.0)
    assert score_rows(f, [30]) == pytest.approx(-1.0 - 0.11)


def test_window_partly_in_probation_scores_its_later_rows() -> None:
    f = make_file(200, [(20, 39)], probation=30)
    assert score_rows(f, [25]) == pytest.approx(-1.0)  # detection inside probation ignored
    assert score_rows(f, [25, 30]) == pytest.approx(sig(-10 / 20) / sig(-1.0))


def test_optimise_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    files = [make_file(300, [(60, 79), (200, 229)], probation=45), make_file(250, [(120, 139)], probation=37)]
    files = [nab.NabFile(f"toy/{i}.csv", f.timestamps, f.values, f.windows, f.probation) for i, f in enumerate(files)]
    scores = {f.name: np.round(rng.random(len(f.timestamps)) ** 4, 2) for f in files}
    for f in files:  # make windows attractive so the optimum is non-trivial
        for left, _ in f.windows:
            scores[f.name][left + 3] = 0.9
    for costs in nab.PROFILES.values():
        thr, best = nab.optimise(files, scores, costs)
        brute = {
            float(t): nab.normalised(files, nab.score_detections(files, {k: v >= t for k, v in scores.items()}, costs),
                                     costs)
            for t in np.unique(np.concatenate(list(scores.values())))
        }
        assert best == pytest.approx(max(brute.values()))
        assert brute[thr] == pytest.approx(best)


# ---------------------------------------------------------------- the published corpus

needs_data = pytest.mark.skipif(not (DATA_DIR / "labels" / "combined_windows.json").exists(),
                                reason=f"NAB data not found at {DATA_DIR}")


@pytest.fixture(scope="module")
def corpus() -> list[nab.NabFile]:
    return nab.load_corpus(DATA_DIR)


@pytest.fixture(scope="module")
def published() -> dict[str, dict[str, float]]:
    data: dict[str, dict[str, float]] = json.loads((DATA_DIR / "results" / "final_results.json").read_text())
    return data


@needs_data
def test_corpus_shape(corpus: list[nab.NabFile]) -> None:
    assert len(corpus) == 58
    assert sum(len(f.timestamps) for f in corpus) == 365_558
    assert sum(len(f.windows) for f in corpus) == 116
    assert nab.load_profiles(DATA_DIR) == nab.PROFILES


@needs_data
@pytest.mark.parametrize("detector", DETECTORS)
def test_per_file_scores_at_published_threshold(detector: str, corpus: list[nab.NabFile],
                                                published: dict[str, dict[str, float]]) -> None:
    """Scoring the published per-row outputs at NAB's own thresholds reproduces every per-file score."""
    scores = nab.load_detector_scores(DATA_DIR / "results" / detector, detector, corpus)
    by_name = {f.name: f for f in corpus}
    for profile, costs in nab.PROFILES.items():
        with (DATA_DIR / "results" / detector / f"{detector}_{profile}_scores.csv").open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["File"] in by_name]
        threshold = float(rows[0]["Threshold"])
        for r in rows:
            f = by_name[r["File"]]
            got = nab.score_detections([f], {f.name: scores[f.name] >= threshold}, costs)
            assert got == pytest.approx(float(r["Score"]), abs=1e-6), (profile, f.name)
        raw = nab.score_detections(corpus, {k: v >= threshold for k, v in scores.items()}, costs)
        assert nab.normalised(corpus, raw, costs) == pytest.approx(published[detector][profile], abs=1e-6)


@needs_data
@pytest.mark.parametrize("detector", DETECTORS)
def test_optimised_scores_match_published(detector: str, corpus: list[nab.NabFile],
                                          published: dict[str, dict[str, float]]) -> None:
    scores = nab.load_detector_scores(DATA_DIR / "results" / detector, detector, corpus)
    got = nab.score_all_profiles(corpus, scores, nab.PROFILES)
    for profile, value in got.items():
        expected = published[detector][profile]
        if (detector, profile) == ("numenta", "reward_low_FP_rate"):
            # NAB's published threshold (0.5752) is not one of numenta's score values: its optimiser was a local
            # search that stopped at a local optimum.  The exact sweep finds a better threshold (0.5431, +0.09).
            assert expected <= value <= expected + 0.1, (profile, value, expected)
        else:
            assert value == pytest.approx(expected, abs=0.05), (profile, value, expected)
