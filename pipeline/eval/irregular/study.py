"""``liquidstream evaluate irregular``: does knowing the real gap between readings help forecasting?

On irregular streams (:mod:`liquidstream.pipeline.eval.irregular.data`: the real Mauna Loa CO2 and WaterFlow recordings
thinned into bursts and dropouts, and the simulator thinned by random drops) five one-step forecasters are trained the
way production trains them (:class:`liquidstream.operators.training.Trainer`, same hidden size, epochs, window and seed;
learning rate per cell kind, :data:`LEARNING_RATES`) and scored on held-out streams
(:func:`liquidstream.pipeline.eval.irregular.bins.gap_metrics`: one-step MSE and Gaussian NLL in per-device normalised
units, every reading after warm-up, and the MSE binned by the true gap):

* ``cfc`` / ``ltc``: the liquid cells given the true gaps (as the operator runs them; LTC with its time
  constants initialised on the streams' scale, :data:`LTC_TAU_INIT_S`);
* ``cfc dt=1`` / ``ltc dt=1``: the same cells fed ``dt = 1`` (the nominal period) for every reading, train
  and test alike: gap-blind;
* ``gru+gap``: a GRU (no continuous-time dynamics) given the gap as an input feature;
* ``persistence``: the untrained forecaster (last reading, unit spread), the floor every model starts from.

Three training objectives, the same for every model: ``nll`` (production: mean and spread), ``mse``
(:func:`fix_spread`: the spread stays at unit std, so the NLL is squared error) and ``beta-nll`` (the
trainer's ``beta = 1``: mean and spread, the mean's gradient that of squared error).  Under NLL a gap-aware
model first learns to widen its spread after long gaps, and the mean, whose gradient is divided by the
spread squared, learns slowly; the MSE target is therefore judged on the ``mse`` objective.  The
``sines`` stream is a control where the gap matters by construction.

Next to the cells, :mod:`liquidstream.pipeline.eval.irregular.reference` measures what each stream allows: an MLP given
the last readings with their exact ages, against its gap-blind twin, scored on the same readings.

Mean and standard deviation over ``seeds`` seeds (model initialisation and stream thinning).  The peers'
part (River detectors next to the operator, on simulated irregular streams with injected incidents) is in
:mod:`liquidstream.pipeline.eval.irregular.peers`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from liquidstream.operators.training import Sequences, Trainer
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.eval.irregular.bins import bin_labels, gap_metrics
from liquidstream.pipeline.eval.irregular.data import (
    Columns,
    co2_streams,
    elnino_streams,
    simulated,
    smooth_sines,
    water_flow_streams,
)
from liquidstream.pipeline.eval.irregular.models import LTC_TAU_INIT_S, build_model, fix_spread, gap_blind
from liquidstream.pipeline.eval.irregular.reference import window_reference
from liquidstream.pipeline.settings import Settings

#: Default epochs, truncated-BPTT window (readings) and seeds.  The CPU cost is per time step, so a short window
#: gives more optimiser steps for the same time; windows of 16-64 were tried and learned less in the same time
#: (docs/evaluation.md, section 2).
IRREGULAR_EPOCHS, WINDOW, IRREGULAR_SEEDS = 10, 8, 2
#: The study's streams (:func:`streams`; ``sines`` is the control) and training objectives (:func:`run_model`).
STREAMS, OBJECTIVES = ("co2", "elnino", "waterflow", "simulator", "sines"), ("mse", "nll", "beta-nll")
#: What ``liquidstream evaluate irregular`` runs unless told otherwise: the target's irregular streams, the
#: objective that matches the target metric (MSE); with the peers a few minutes on a 2-core box.
DEFAULT_STREAMS, DEFAULT_OBJECTIVES = ("co2", "elnino", "waterflow", "simulator"), ("mse",)
#: Adam learning rate per cell kind, a cell and its gap-blind twin alike: LTC learns slowly at 3e-3 (at 10
#: epochs, 1e-2 matched 20 epochs at 3e-3 on co2); CfC learned less at 1e-2 (docs/evaluation.md, section 2).
LEARNING_RATES = {"cfc": 3e-3, "ltc": 1e-2, "gru": 3e-3}
#: Simulated devices the simulator stream's models train on (150 s each; 32 other devices are held out).  The
#: simulator, unlike a recording, gives any amount of data: ``--sim-train-devices 960`` measures what ten
#: times more buys (docs/evaluation.md, section 2); the default keeps the study to a few minutes.
SIM_TRAIN_DEVICES = 96
#: The gap bins of :mod:`liquidstream.pipeline.eval.irregular.bins`, in order.
BIN_LABELS = bin_labels()
#: Model name -> (cell kind, gap-aware).  ``gru`` is :class:`GRUGapCell`.
MODELS: dict[str, tuple[str, bool]] = {"cfc": ("cfc", True), "cfc dt=1": ("cfc", False), "ltc": ("ltc", True),
                                       "ltc dt=1": ("ltc", False), "gru+gap": ("gru", True)}


def _seqs(cols: Columns) -> Sequences:
    return Sequences.from_columns(*cols)


def streams(name: str, seed: int, sim_train_devices: int = SIM_TRAIN_DEVICES) -> tuple[Sequences, Sequences]:
    """Train and held-out test sequences of one study stream."""
    if name in (recordings := {"co2": co2_streams, "elnino": elnino_streams, "waterflow": water_flow_streams}):
        return _seqs((parts := recordings[name](seed))[0]), _seqs(parts[1])
    if name == "sines":
        return _seqs(smooth_sines(1000 + seed, 96, 450.0)), _seqs(smooth_sines(2000 + seed, 32, 450.0))
    tr, _ = simulated(seed=1000 + seed, devices=sim_train_devices, duration_s=150.0)
    te, _ = simulated(seed=2000 + seed, devices=32, duration_s=150.0)  # other devices: held out
    return _seqs(tr), _seqs(te)


def run_model(name: str, train: Sequences, test: Sequences, *, epochs: int, hidden_size: int, seed: int,
              device: str, objective: str = "nll") -> dict[str, Any]:
    """Train ``name`` on ``train`` and return :func:`~liquidstream.pipeline.eval.irregular.bins.gap_metrics` on
    ``test``.

    ``objective`` is ``"nll"`` (production: mean and spread), ``"mse"`` (:func:`fix_spread`) or
    ``"beta-nll"`` (:class:`~liquidstream.operators.training.Trainer` ``beta = 1``)."""
    true_dt = test.dt
    if name == "persistence":  # an untrained forecaster: last reading, unit spread (the head starts at zero)
        return gap_metrics(Trainer(build_model("cfc", test.values.shape[2], hidden_size), device=device), test,
                           true_dt)
    kind, aware = MODELS[name]
    if not aware:
        train, test = gap_blind(train), gap_blind(test)
    torch.manual_seed(seed)
    model = build_model(kind, train.values.shape[2], hidden_size)
    if objective == "mse":
        fix_spread(model)
    trainer = Trainer(model, window=WINDOW, lr=LEARNING_RATES[kind], seed=seed, device=device,
                      beta=1.0 if objective == "beta-nll" else 0.0)
    trainer.fit(train, epochs)
    return gap_metrics(trainer, test, true_dt)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and population std over seeds of each metric; per-gap MSE and counts as means over seeds."""
    out: dict[str, Any] = {}
    for key in ("mse", "nll"):
        vals = [r[key] for r in runs]
        out[key], out[f"{key}_std"] = float(np.mean(vals)), float(np.std(vals))
    labels = sorted({b for r in runs for b in r["mse_by_gap"]}, key=lambda b: BIN_LABELS.index(b))
    for key in ("mse_by_gap", "n_by_gap"):  # a bin may be empty under one seed's thinning only
        out[key] = {b: float(np.mean([r[key][b] for r in runs if b in r[key]])) for b in labels}
    return out


def _reference_summary(refs: list[dict[str, float]]) -> dict[str, float]:
    """Means and stds over seeds of :func:`~liquidstream.pipeline.eval.irregular.reference.window_reference`; the gain
    of the means."""
    out = {f"{k}{suffix}": float(fn([r[k] for r in refs])) for k in ("mse", "blind_mse")
           for suffix, fn in (("", np.mean), ("_std", np.std))}
    out["gain_pct"] = 100.0 * (out["blind_mse"] - out["mse"]) / out["blind_mse"]
    return out


def evaluate_irregular(settings: Settings, *, epochs: int = IRREGULAR_EPOCHS, hidden_size: int = 32,
                       seeds: int = IRREGULAR_SEEDS, peers: bool = True,
                       stream_names: tuple[str, ...] = DEFAULT_STREAMS,
                       objectives: tuple[str, ...] = DEFAULT_OBJECTIVES,
                       sim_train_devices: int = SIM_TRAIN_DEVICES) -> dict[str, Any]:
    """The study's tables (and the peers' table unless ``peers`` is False), as one JSON-able dict:
    ``forecast[stream][objective][model]`` holds the metrics' means and stds over seeds."""
    unknown = set(stream_names) - set(STREAMS) | set(objectives) - set(OBJECTIVES)
    if unknown:
        msg = f"unknown irregular-study streams or objectives {sorted(unknown)}: choose from {STREAMS}, {OBJECTIVES}"
        raise ConfigurationError(msg)
    if sim_train_devices < 1:
        msg = f"sim_train_devices must be >= 1, got {sim_train_devices}"
        raise ConfigurationError(msg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few dozen devices x 32 units: intra-op threads only add contention
    try:
        return _evaluate(settings, epochs, hidden_size, seeds, peers, stream_names, objectives, sim_train_devices)
    finally:
        torch.set_num_threads(threads)


def _evaluate(settings: Settings, epochs: int, hidden_size: int, seeds: int, peers: bool,
              stream_names: tuple[str, ...], objectives: tuple[str, ...], sim_devices: int) -> dict[str, Any]:
    device = settings.torch_device()
    t0 = time.perf_counter()
    table: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    reference: dict[str, dict[str, float]] = {}
    for sname in stream_names:
        refs: list[dict[str, float]] = []
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {o: {m: [] for m in (*MODELS, "persistence")}
                                                             for o in objectives}
        for seed in range(seeds):
            train, test = streams(sname, seed, sim_devices)
            base = run_model("persistence", train, test, epochs=0, hidden_size=hidden_size, seed=seed, device=device)
            refs.append(window_reference(train, test, seed=seed))
            for obj in objectives:
                runs[obj]["persistence"].append(base)  # untrained: the same under either objective
                for m in MODELS:
                    runs[obj][m].append(run_model(m, train, test, epochs=epochs, hidden_size=hidden_size, seed=seed,
                                                  device=device, objective=obj))
        table[sname] = {o: {m: _summary(rs) for m, rs in by_model.items()} for o, by_model in runs.items()}
        reference[sname] = _reference_summary(refs)
        for rows in table[sname].values():
            for cell in ("cfc", "ltc"):  # relative MSE gain of the time-aware cell over its gap-blind twin
                blind, aware = rows[f"{cell} dt=1"]["mse"], rows[cell]["mse"]
                rows[cell]["mse_gain_vs_blind_pct"] = 100.0 * (blind - aware) / blind
    report: dict[str, Any] = {"epochs": epochs, "hidden_size": hidden_size, "seeds": seeds, "window": WINDOW,
                              "learning_rates": LEARNING_RATES, "ltc_tau_init_s": LTC_TAU_INIT_S,
                              "sim_train_devices": sim_devices, "forecast": table, "reference": reference}
    if peers:
        from liquidstream.pipeline.eval.irregular.peers import evaluate_peers

        report["peers"] = evaluate_peers(settings, epochs=epochs, hidden_size=hidden_size)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def format_irregular(report: dict[str, Any]) -> str:
    lines = [f"Irregular sampling: one-step forecast on held-out irregular streams, normalised units, mean +- std "
             f"over {report['seeds']} seeds ({report['epochs']} epochs, hidden {report['hidden_size']}, "
             f"window {report['window']}; simulator models trained on "
             f"{report.get('sim_train_devices', SIM_TRAIN_DEVICES)} devices)"]
    for sname, by_obj in report["forecast"].items():
        for obj, rows in by_obj.items():
            head = f"{sname} [{obj} objective]:"
            pad = " " * len(head)
            lines.append(f"{head} {'model':10s} {'MSE':>16s} {'NLL':>16s}  MSE gain vs gap-blind")
            for m, r in rows.items():
                gain = f"{r['mse_gain_vs_blind_pct']:+.1f} %" if "mse_gain_vs_blind_pct" in r else ""
                lines.append(f"{pad} {m:10s} {r['mse']:8.4f} +- {r['mse_std']:.4f} "
                             f"{r['nll']:8.3f} +- {r['nll_std']:.3f}  {gain}")
            labels = list(rows["persistence"]["mse_by_gap"])
            lines.append(f"{pad} {'MSE by gap':10s} " + " ".join(f"{b:>10s}" for b in labels))
            lines.append(f"{pad} {'(readings)':10s} "
                         + " ".join(f"{rows['persistence']['n_by_gap'][b]:10.0f}" for b in labels))
            for m, r in rows.items():
                lines.append(f"{pad} {m:10s} " + " ".join(f"{r['mse_by_gap'][b]:10.4f}" for b in labels))
    if report.get("reference"):
        lines.append("What the readings allow: an MLP given the last 8 readings and their exact ages "
                     "(liquidstream.pipeline.eval.irregular.reference) against its gap-blind twin")
        for sname, r in report["reference"].items():
            lines.append(f"  {sname:10s} with times {r['mse']:.4f} +- {r['mse_std']:.4f}   gap-blind "
                         f"{r['blind_mse']:.4f} +- {r['blind_mse_std']:.4f}   gain {r['gain_pct']:+.1f} %")
    if "peers" in report:
        from liquidstream.pipeline.eval.irregular.peers import format_peers

        lines.append(format_peers(report["peers"]))
    return "\n".join(lines)
