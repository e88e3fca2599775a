"""The embedded demo: simulate a fleet, train briefly, stream the rest through the operator, score it.

No broker needed.  Writes ``summary.json``, ``predictions.jsonl``, ``alerts.jsonl``, ``incidents.jsonl``
(the injected ground truth), ``model.pt``/``model.json`` and ``plot.png`` into the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from liquidstream.operators import Forecaster, LiquidOperator
from liquidstream.operators.model_io import save_model
from liquidstream.operators.training import HOLDOUT, Sequences, Trainer
from liquidstream.pipeline.eval.incidents import score_incidents
from liquidstream.pipeline.offline.progress import Progress
from liquidstream.pipeline.offline.report import DeviceSeries, pick_devices, plot_devices
from liquidstream.pipeline.offline.simulator import SimulatedStream, simulate
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.records import alert_records, opened_record, prediction_records

#: ``source.file`` of the demo's records: it has no input file, its readings come from the simulator.
DEMO_SOURCE = "demo:simulator"


@dataclass(frozen=True)
class DemoConfig:
    devices: int = 200
    duration_s: float = 1800.0  # simulated seconds per device
    train_s: float = 600.0  # the first train_s seconds (incident-free): training data and commissioning
    channels: int = 4
    anomaly_rate: float = 3.0  # incidents per device per hour
    seed: int = 7
    cell: str = "cfc"
    hidden_size: int = 32
    epochs: int = 8
    plot_devices: int = 4


def train_model(stream: SimulatedStream, cfg: DemoConfig, settings: Settings, show: bool) -> tuple[Forecaster, float]:
    """Train a fresh forecaster on ``stream``; returns it and the training wall time in seconds."""
    torch.manual_seed(cfg.seed)
    options: dict[str, object] = {"backbone_units": cfg.hidden_size} if cfg.cell == "cfc" else {}
    seqs = Sequences.from_columns(list(stream.device_ids), stream.ts_ms, stream.values)
    model = Forecaster(n_channels=cfg.channels, hidden_size=cfg.hidden_size, cell=cfg.cell, cell_options=options,
                       time_scale_s=seqs.typical_gap_s())
    trainer = Trainer(model, window=32, batch_devices=256, lr=2e-3, stats_alpha=settings.operator.stats_alpha,
                      device=settings.torch_device(), seed=cfg.seed)
    start = time.perf_counter()
    with Progress("train", unit="step", enabled=show) as bar:
        trainer.fit(seqs, cfg.epochs, progress=lambda done, total, loss: bar.update(done, total, loss=loss),
                    holdout=HOLDOUT)
    return model.cpu().eval(), time.perf_counter() - start


def run_demo(settings: Settings, out_dir: Path, cfg: DemoConfig | None = None, *, show: bool = True) -> dict[str, Any]:
    cfg = cfg or DemoConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    sim = simulate(n_devices=cfg.devices, duration_s=cfg.duration_s, channels=cfg.channels, seed=cfg.seed,
                   anomaly_rate=cfg.anomaly_rate, normal_prefix_s=cfg.train_s)
    cut_ms = int(sim.ts_ms.min()) + int(cfg.train_s * 1000)
    train_part = sim.ts_ms < cut_ms
    train_stream = SimulatedStream(sim.device_ids[train_part], sim.ts_ms[train_part], sim.values[train_part], ())
    model, train_s = train_model(train_stream, cfg, settings, show)
    version = save_model(model, out_dir / "model.pt", {"trained_on": "demo simulator", "seed": cfg.seed,
                                                       "stats_alpha": settings.operator.stats_alpha})
    op = LiquidOperator(model, settings.operator, device=settings.torch_device(), model_version=version)
    # The training part is each device's commissioning data (normal by construction): the devices stream it
    # first, so the operator learns their normal behaviour from it, exactly as a commissioned device would.
    commissioned, counts = np.unique(train_stream.device_ids, return_counts=True)
    op.set_commissioning(commissioned.tolist(), counts.tolist())

    ids = sim.device_ids.tolist()
    ts, vals = sim.ts_ms, sim.values
    batch = settings.batch_max_messages
    forecasts = np.full(vals.shape, np.nan, np.float32)
    stds = np.full(vals.shape, np.nan, np.float32)
    fts = np.zeros(len(ids), np.int64)
    alerts: list[dict[str, Any]] = []
    n_pred = 0
    compute_s = 0.0
    with (out_dir / "predictions.jsonl").open("w") as pred_f, Progress("stream", unit="ev", enabled=show) as bar:
        for lo in range(0, len(ids), batch):
            hi = min(lo + batch, len(ids))
            t0 = time.perf_counter()
            res = op.process(ids[lo:hi], ts[lo:hi], vals[lo:hi])
            compute_s += time.perf_counter() - t0
            forecasts[lo:hi], stds[lo:hi], fts[lo:hi] = res.forecast, res.forecast_std, res.forecast_ts_ms
            for i, rec in prediction_records(ids[lo:hi], res, version):
                rec["source"] = {"file": DEMO_SOURCE, "line": lo + i + 1}  # position in the simulated stream
                pred_f.write(json.dumps(rec) + "\n")
                n_pred += 1
            for i, rec in alert_records(res, version):
                rec["source"] = {"file": DEMO_SOURCE, "line": lo + i + 1}
                alerts.append(rec)
            for alert in op.check_silence(int(ts[lo:hi].max())):  # the simulator's dropouts: silent devices
                alerts.append(opened_record(alert, version) | {"source": {"file": DEMO_SOURCE, "line": hi}})
            bar.update(hi, len(ids), events_per_s=hi / max(compute_s, 1e-9),
                       alerts=sum(a["event"] == "opened" for a in alerts))
    with (out_dir / "alerts.jsonl").open("w") as f:
        f.writelines(json.dumps(a) + "\n" for a in alerts)
    incidents = [i for i in sim.incidents if i.start_ms >= cut_ms]
    with (out_dir / "incidents.jsonl").open("w") as f:
        f.writelines(json.dumps(i.to_dict()) + "\n" for i in incidents)
    # One opened record per incident (closed records follow them); silences are scored apart: the simulator's
    # injected incidents are anomalies in the readings, its dropouts are not incidents
    opened = [a for a in alerts if a["event"] == "opened" and a["reason"] != "silence"]
    silences = sum(a["event"] == "opened" and a["reason"] == "silence" for a in alerts)
    quality = score_incidents(((a["device_id"], a["ts"]) for a in opened),
                              ((i.device_id, i.kind, i.start_ms, i.end_ms) for i in incidents))
    _plot(out_dir / "plot.png", cfg, ids, ts, vals, fts, forecasts, stds, opened, incidents)
    summary = {"events": len(ids), "devices": len(set(ids)), "predictions": n_pred, "alerts": len(opened),
               "alerts_closed": sum(a["event"] == "closed" and a["reason"] != "silence" for a in alerts),
               "silence_alerts": silences,
               "precision": round(quality.precision, 4), "recall": round(quality.recall, 4),
               "events_per_s": round(len(ids) / max(compute_s, 1e-9), 1),
               "events_per_s_note": "operator.process time only (state, waves, scoring), excluding JSON output",
               "train_events": int(train_part.sum()), "train_seconds": round(train_s, 2),
               "incidents": quality.as_dict(), "model_version": version, "cell": cfg.cell,
               "hidden_size": cfg.hidden_size, "device": str(op.device), "config": cfg.__dict__}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _plot(path: Path, cfg: DemoConfig, ids: list[str], ts: np.ndarray, vals: np.ndarray, fts: np.ndarray,
          forecasts: np.ndarray, stds: np.ndarray, alerts: list[dict[str, Any]], incidents: list[Any]) -> None:
    id_arr = np.asarray(ids, dtype=object)
    chosen = pick_devices(sorted(set(ids)), [a["device_id"] for a in alerts], [i.device_id for i in incidents],
                          n=cfg.plot_devices)
    series = []
    for dev in chosen:
        m = id_arr == dev
        ok = np.isfinite(forecasts[m]).all(axis=1)
        series.append(DeviceSeries(
            device_id=dev, ts_ms=ts[m], values=vals[m], forecast_ts_ms=fts[m][ok], forecast=forecasts[m][ok],
            forecast_std=stds[m][ok],
            alert_ts_ms=np.array([a["ts"] for a in alerts if a["device_id"] == dev], np.int64),
            incidents=[(i.start_ms, i.end_ms) for i in incidents if i.device_id == dev]))
    plot_devices(path, series,
                 title="liquidstream demo: readings, next-reading forecast (±2σ), alerts, injected incidents")
