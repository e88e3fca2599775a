"""File replay and offline training from JSONL readings: how outside data is evaluated.

Input: one JSON reading per line, ``{"device_id": str, "ts": epoch_ms int, "values": [float, ...]}``, in any
device interleaving, or any shape the settings' input mapping describes (:mod:`liquidstream.pipeline.wire.mapping`).
Lines are validated by the same codec as the Kafka worker; an invalid line is reported in ``invalid.jsonl`` (a
``dead-letter`` record: reason, detail, source file and 1-based line) and never stops the run.  Readings the
operator drops by policy (late, duplicate) are reported there too, so ``lines = predictions + invalid`` always
holds (long shape: ``lines = assembled + invalid``, one prediction per assembled reading).  Every record's
``source`` is the input file and line (for an assembled reading: the line that completed it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from liquidstream.operators import Forecaster, LiquidOperator
from liquidstream.operators.model_io import save_model
from liquidstream.operators.result import EventStatus
from liquidstream.operators.training import HOLDOUT, Sequences, Trainer
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.offline.progress import Progress
from liquidstream.pipeline.offline.readings import read_jsonl
from liquidstream.pipeline.serving import open_model
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.codec import DecodedBatch
from liquidstream.pipeline.wire.records import alert_records, opened_record, prediction_records


@dataclass(frozen=True)
class ReplayConfig:
    model: Path | None = None
    train_fraction: float = 0.0  # first fraction of each device's readings (by event time) trains a model
    epochs: int = 8
    cell: str = "cfc"
    hidden_size: int = 32


def train_model(batch: DecodedBatch, n_channels: int, settings: Settings, *, cell: str, hidden_size: int,
                epochs: int, show: bool) -> Forecaster:
    options: dict[str, object] = {"backbone_units": hidden_size} if cell == "cfc" else {}
    seqs = Sequences.from_columns(batch.device_ids, batch.ts_ms, batch.values)
    model = Forecaster(n_channels=n_channels, hidden_size=hidden_size, cell=cell, cell_options=options,
                       time_scale_s=seqs.typical_gap_s())
    trainer = Trainer(model, window=32, lr=2e-3, stats_alpha=settings.operator.stats_alpha,
                      device=settings.torch_device())
    with Progress("train", unit="step", enabled=show) as bar:
        trainer.fit(seqs, epochs, progress=lambda done, total, loss: bar.update(done, total, loss=loss),
                    holdout=HOLDOUT)
    return model.cpu().eval()


def _train_part(batch: DecodedBatch, fraction: float) -> np.ndarray:
    """Mask of each device's first ``fraction`` of readings by event time."""
    ids = np.asarray(batch.device_ids, dtype=object)
    mask = np.zeros(len(ids), bool)
    for dev in np.unique(ids):
        pos = np.flatnonzero(ids == dev)
        pos = pos[np.argsort(batch.ts_ms[pos], kind="stable")]
        mask[pos[: int(len(pos) * fraction)]] = True
    return mask


def skipped_lines(batch: DecodedBatch) -> dict[str, int]:
    """Rejected lines by reason."""
    return _count(str(r.reason) for r in batch.rejects)


def train_from_file(settings: Settings, input_path: Path, out: Path, *, cell: str, hidden_size: int,
                    epochs: int, show: bool) -> dict[str, Any]:
    """``liquidstream train``: fit a model on every valid reading of a file; returns its version and the counts
    (``readings`` trained on, ``skipped`` lines by reason).  No valid reading is a :class:`ConfigurationError`."""
    batch, c, _ = read_jsonl(input_path, settings, None)
    skipped = skipped_lines(batch)
    if not len(batch):
        first = batch.rejects[0] if batch.rejects else None
        example = f"; line {first.index + 1}: {first.reason}: {first.detail}" if first else ""
        msg = f"--input {input_path}: no valid reading to train on ({skipped or 'empty file'}){example}"
        raise ConfigurationError(msg)
    model = train_model(batch, c, settings, cell=cell, hidden_size=hidden_size, epochs=epochs, show=show)
    version = save_model(model, out, {"trained_on": str(input_path), "readings": len(batch),
                                      "stats_alpha": settings.operator.stats_alpha})
    return {"model": str(out), "version": version, "readings": len(batch), "channels": c,
            "skipped": sum(skipped.values()), "skipped_by_reason": skipped}


def _out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"--out {out_dir}: is a file; give a folder (created if missing) for predictions.jsonl, alerts.jsonl ..."
        raise ConfigurationError(msg)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as ex:
        msg = f"--out {out_dir}: cannot create the folder ({ex.strerror})"
        raise ConfigurationError(msg) from ex


def run_replay(settings: Settings, input_path: Path, out_dir: Path, cfg: ReplayConfig, *,
               show: bool = True) -> dict[str, Any]:
    _out_dir(out_dir)
    model: Forecaster | None = None
    version = "untrained"
    device = settings.torch_device()
    if cfg.model is not None:
        model, doc = open_model(cfg.model)
        version = str(doc["version"])
    batch, c, assembled = read_jsonl(input_path, settings, model.n_channels if model else None)
    part = np.zeros(len(batch), bool)
    if model is None:
        if cfg.train_fraction > 0 and len(batch):
            part = _train_part(batch, cfg.train_fraction)
            sub = DecodedBatch(batch.index[part], [d for d, p in zip(batch.device_ids, part, strict=True) if p],
                               batch.ts_ms[part], batch.values[part], [], [])
            model = train_model(sub, c, settings, cell=cfg.cell, hidden_size=cfg.hidden_size, epochs=cfg.epochs,
                                show=show)
            version = save_model(model, out_dir / "model.pt", {"trained_on": str(input_path),
                                                               "train_fraction": cfg.train_fraction})
        else:
            torch.manual_seed(0)
            model = Forecaster(n_channels=c, hidden_size=cfg.hidden_size, cell=cfg.cell)  # persistence at init
    op = LiquidOperator(model, settings.operator, device=device, model_version=version)
    if cfg.train_fraction > 0 and cfg.model is None:
        # The readings a device's model trained on are that device's commissioning data (assumed normal).
        trained, counts = np.unique(np.asarray(batch.device_ids, dtype=object)[part], return_counts=True)
        op.set_commissioning([str(d) for d in trained], counts.tolist())
    name = str(input_path)

    def src(line: int) -> dict[str, Any]:
        return {"file": name, "line": line}

    invalid = [{"line": r.index + 1, "reason": str(r.reason), "detail": r.detail, "source": src(r.index + 1)}
               for r in batch.rejects]
    n_pred = n_alerts = n_closed = 0
    stream_ms = int(np.iinfo(np.int64).min)
    step = settings.batch_max_messages
    with (out_dir / "predictions.jsonl").open("wb") as pf, (out_dir / "alerts.jsonl").open("w") as af, \
            Progress("replay", unit="ev", enabled=show) as bar:
        for lo in range(0, len(batch), step):
            hi = min(lo + step, len(batch))
            ids = batch.device_ids[lo:hi]
            res = op.process(ids, batch.ts_ms[lo:hi], batch.values[lo:hi])
            encoded: list[bytes] = []
            for i, rec in prediction_records(ids, res, version):
                rec["source"] = src(int(batch.index[lo + i]) + 1)
                encoded.append(orjson.dumps(rec))  # (prediction_records holds no NaN: a missing score is None)
            pf.write(b"\n".join(encoded) + b"\n" if encoded else b"")
            n_pred += len(encoded)
            for i, rec in alert_records(res, version, channel_names=batch.channels[lo:hi]):
                rec["source"] = src(int(batch.index[lo + i]) + 1)
                af.write(json.dumps(rec) + "\n")
                n_alerts += rec["event"] == "opened"
                n_closed += rec["event"] == "closed"
            # the stream (this file) moved on to the newest reading so far: devices quiet for too long open silences
            stream_ms = max(stream_ms, int(batch.ts_ms[lo:hi].max()))
            for alert in op.check_silence(stream_ms):
                rec = opened_record(alert, version) | {"source": src(int(batch.index[hi - 1]) + 1)}
                af.write(json.dumps(rec) + "\n")
                n_alerts += 1
            for i in np.flatnonzero(~res.applied).tolist():
                label = "late" if res.status[i] == EventStatus.LATE_DROPPED else "duplicate"
                line = int(batch.index[lo + i]) + 1
                invalid.append({"line": line, "reason": label, "source": src(line),
                                "detail": f"device {ids[i]!r} ts={int(res.ts_ms[i])} dropped by the {label} policy"})
            bar.update(hi, len(batch), alerts=n_alerts)
    invalid.sort(key=lambda r: int(str(r["line"])))
    with (out_dir / "invalid.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in invalid)
    lines = assembled + len(batch.rejects)
    summary = {"lines": lines, "valid": len(batch), "invalid": len(invalid), "predictions": n_pred,
               "alerts": n_alerts, "alerts_closed": n_closed, "devices": len(op.store), "channels": c,
               "model_version": version,
               "invalid_by_reason": _count(r["reason"] for r in invalid)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
