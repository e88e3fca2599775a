"""Synthetic, irregularly sampled multichannel sensor streams with labelled (ground-truth) anomalies.

The one generator behind the embedded demo, ``liquidstream simulate`` and the tests.  Deterministic given a
seed: device ``d`` draws only from child ``d`` of ``SeedSequence(seed)``, itself split into timing, dynamics,
noise and incident streams.  So the first ``k`` devices do not depend on ``n_devices``, and two runs that
differ only in ``anomaly_rate`` have identical timestamps and identical readings outside incident windows.

Each channel is a function of continuous time sampled at the device's irregular reading times: a per-device
offset and scale, a shared latent of 1-2 sinusoids (periods 20-120 s) that every channel sees time-shifted and
mixed, a small own oscillation per channel, a slow drift, and Gaussian noise of 5 % of the channel amplitude.

Units: ``ts_ms`` is epoch milliseconds (int64); ``*_s`` arguments and all compute time are float seconds.

>>> s = simulate(n_devices=3, duration_s=60.0, seed=1)
>>> s.values.dtype, s.values.shape[1], sorted(set(s.device_ids)), s.incidents
(dtype('float32'), 4, ['dev-0000', 'dev-0001', 'dev-0002'], ())
>>> bool(np.all(np.diff(s.ts_ms) >= 0)) and len(s.ts_ms) == len(s.values) > 60
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
from numpy.typing import NDArray

from liquidstream.operators.errors import ConfigError

KINDS = ("spike", "level_shift", "frequency_change", "stuck")
MIN_SEPARATION_S = 180.0  # s from an incident's last affected reading to the next one's first (same device)
StrPath = str | PathLike[str]
F64 = NDArray[np.float64]
TWO_PI = 2.0 * math.pi


@dataclass(frozen=True)
class Incident:
    """An injected anomaly: readings of ``device_id`` with ``start_ms <= ts <= end_ms`` (epoch ms).

    Only ``channels`` are affected.  ``end_ms`` is the time of the last affected reading.  For ``stuck``
    the reading at ``start_ms`` is normal and holds the value that the later readings repeat exactly.
    """

    device_id: str
    kind: str  # one of KINDS
    start_ms: int
    end_ms: int
    channels: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "kind": self.kind, "start_ms": self.start_ms,
                "end_ms": self.end_ms, "channels": list(self.channels)}


def _write_jsonl(path: StrPath, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")


@dataclass(frozen=True)
class SimulatedStream:
    """All devices' readings in stream order (``ts_ms`` ascending, ties by device index) plus ground truth."""

    device_ids: NDArray[np.object_]  # [N] str
    ts_ms: NDArray[np.int64]  # [N] epoch milliseconds
    values: NDArray[np.float32]  # [N, C]
    incidents: tuple[Incident, ...]  # sorted by (start_ms, device_id)

    def records(self) -> Iterator[dict[str, Any]]:
        """``{"device_id", "ts", "values"}`` dicts in stream order (``ts`` epoch ms, values float32-exact)."""
        columns = self.device_ids.tolist(), self.ts_ms.tolist(), self.values.tolist()
        for dev, ts, row in zip(*columns, strict=True):
            yield {"device_id": dev, "ts": ts, "values": row}

    def to_jsonl(self, path: StrPath) -> None:
        _write_jsonl(path, self.records())

    def incidents_jsonl(self, path: StrPath) -> None:
        _write_jsonl(path, (incident.to_dict() for incident in self.incidents))

    def split_by_time(self, fraction: float) -> tuple[SimulatedStream, SimulatedStream]:
        """Per device, readings before ``first + fraction * (last - first)`` and the rest.

        An incident goes with the part it starts in (it may run on into the second part).
        """
        if not 0.0 < fraction < 1.0:
            msg = f"fraction must be in (0, 1), got {fraction}"
            raise ConfigError(msg)
        names, inverse = np.unique(self.device_ids.astype(str), return_inverse=True)
        first_ms = np.full(len(names), np.iinfo(np.int64).max, dtype=np.int64)
        last_ms = np.full(len(names), np.iinfo(np.int64).min, dtype=np.int64)
        np.minimum.at(first_ms, inverse, self.ts_ms)
        np.maximum.at(last_ms, inverse, self.ts_ms)
        cut_ms = first_ms + fraction * (last_ms - first_ms)  # float epoch ms, per device
        head = self.ts_ms < cut_ms[inverse]
        cut_of = dict(zip(names.tolist(), cut_ms.tolist(), strict=True))
        early = [i.start_ms < cut_of.get(i.device_id, math.inf) for i in self.incidents]
        parts = tuple(
            SimulatedStream(self.device_ids[mask], self.ts_ms[mask], self.values[mask],
                            tuple(i for i, e in zip(self.incidents, early, strict=True) if e == want))
            for mask, want in ((head, True), (~head, False)))
        return parts[0], parts[1]


def _reading_offsets_ms(rng: np.random.Generator, duration_s: float, mean_gap_s: float) -> NDArray[np.int64]:
    """Irregular reading times of one device, ms since the stream start, strictly increasing, < duration."""
    gap = mean_gap_s / math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # s; device rate 0.5x-2x
    chunks = [np.array([rng.uniform(0.0, gap)])]
    while chunks[-1][-1] < duration_s:
        n = int((duration_s - chunks[-1][-1]) / gap) + 16
        base = np.maximum(rng.gamma(4.0, gap / 4.0, n), 0.01)  # s; jitter CV 0.5, >= 10 ms
        dropout = rng.random(n) < gap / 1800.0  # about one dropout per 30 min
        base[dropout] = rng.uniform(20.0, 300.0, int(dropout.sum()))
        burst = np.where(rng.random(n) < gap / 120.0, rng.integers(2, 7, n), 0)  # about one burst per 2 min
        gaps = rng.uniform(0.05, 0.2, n + int(burst.sum()))  # s; burst readings 50-200 ms apart
        gaps[np.cumsum(burst + 1) - (burst + 1)] = base
        chunks.append(chunks[-1][-1] + np.cumsum(gaps))
    t = np.concatenate(chunks)
    return np.floor(t[t < duration_s] * 1000.0).astype(np.int64)  # gaps >= 10 ms keep the ms distinct


class _Dynamics:
    """One device's continuous-time signal ``signal(t, warp, noise)``: t in s, warp = extra primary phase."""

    def __init__(self, rng: np.random.Generator, channels: int) -> None:
        c = channels
        self.periods = rng.uniform(20.0, 120.0, 2)  # s
        self.phases = rng.uniform(0.0, TWO_PI, 2)
        self.amps = np.array([1.0, rng.uniform(0.3, 0.7) * float(rng.random() < 0.5)])  # 1 or 2 sinusoids
        self.lag = rng.uniform(0.0, 10.0, c)  # s; channel k sees the latent at t + lag[k]
        self.mix = rng.uniform(0.6, 1.0, c) * rng.choice([-1.0, 1.0], c)
        self.own = rng.uniform(0.1, 0.3, c), rng.uniform(5.0, 30.0, c), rng.uniform(0.0, TWO_PI, c)
        self.drift = rng.uniform(0.2, 0.5, c), rng.uniform(1800.0, 7200.0, c), rng.uniform(0.0, TWO_PI, c)
        self.offset = rng.uniform(-200.0, 200.0, c)
        self.scale = np.exp(rng.uniform(math.log(0.05), math.log(50.0), c))
        amplitude = np.abs(self.mix) * self.amps.sum() + self.own[0]
        self.noise_std = 0.05 * amplitude  # in unscaled units

    def signal(self, t: F64, warp: F64, noise: F64) -> F64:
        tc = t[:, None] + self.lag[None, :]  # [n, C] s
        z = self.amps[0] * np.sin(TWO_PI * tc / self.periods[0] + self.phases[0] + warp)
        z += self.amps[1] * np.sin(TWO_PI * tc / self.periods[1] + self.phases[1])
        s = self.mix * z
        for amp, period, phase in (self.own, self.drift):
            s += amp * np.sin(TWO_PI * t[:, None] / period + phase)
        return np.asarray(self.offset + self.scale * (s + self.noise_std * noise), dtype=np.float64)


def _device(rngs: list[np.random.Generator], device_id: str, t_ms: NDArray[np.int64], channels: int,
            anomaly_rate: float, prefix_s: float, start_ms: int) -> tuple[F64, list[Incident]]:
    dyn = _Dynamics(rngs[0], channels)
    noise, rng = rngs[1].standard_normal((len(t_ms), channels)), rngs[2]
    t = t_ms / 1000.0  # s since stream start
    warp = np.zeros_like(noise)
    values = dyn.signal(t, warp, noise)
    std = values.std(axis=0) + 1e-9 * dyn.scale  # channel std of the clean signal, in channel units
    windows: list[tuple[int, int]] = []
    applied: list[tuple[str, int, int, NDArray[np.intp], F64]] = []
    incidents: list[Incident] = []
    span_s = float(t[-1] - t[0]) if len(t) else 0.0  # a short simulation can leave a device with no reading
    for _ in range(rng.poisson(anomaly_rate * max(span_s - prefix_s, 0.0) / 3600.0)):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        chans = np.sort(rng.choice(channels, int(rng.integers(1, channels + 1)), replace=False))
        sign = rng.choice([-1.0, 1.0], channels)
        n_spike, span = int(rng.integers(1, 4)), rng.uniform(30.0, 120.0)  # readings; s
        offset = sign * std * (rng.uniform(6.0, 10.0) if kind == "spike" else rng.uniform(3.0, 6.0))
        factor = rng.uniform(3.0, 5.0) if rng.random() < 0.75 else 0.25
        if kind == "frequency_change":  # whole extra cycles, so the phase after the window is unchanged
            per_cycle = dyn.periods[0] / abs(factor - 1.0)  # s of window per extra cycle
            span = max(1, round(rng.uniform(60.0, 180.0) / per_cycle)) * per_cycle
        elif kind == "spike":
            span = 0.0
        for _try in range(50):
            lo, hi = t[0] + prefix_s, t[-1] - span
            if lo > hi:
                break
            i = int(np.searchsorted(t, rng.uniform(lo, hi)))
            j = i + n_spike - 1 if kind == "spike" else int(np.searchsorted(t, t[i] + span, "right")) - 1
            if j >= len(t) or (kind != "spike" and (j - i < 2 or t[i] + span > t[-1])):
                continue
            if all(t[i] - t[b] >= MIN_SEPARATION_S or t[a] - t[j] >= MIN_SEPARATION_S for a, b in windows):
                windows.append((i, j))
                applied.append((kind, i, j, chans, offset))
                if kind == "frequency_change":
                    extra = TWO_PI * (factor - 1.0) / dyn.periods[0] * (t[i:j + 1] - t[i])  # rad
                    warp[i:j + 1, chans] = extra[:, None]
                incidents.append(Incident(device_id, kind, start_ms + int(t_ms[i]), start_ms + int(t_ms[j]),
                                          tuple(int(c) for c in chans)))
                break
    if warp.any():
        values = dyn.signal(t, warp, noise)
    for kind, i, j, chans, offset in applied:
        if kind in ("spike", "level_shift"):
            values[i:j + 1, chans] += offset[chans]
        elif kind == "stuck":
            values[i + 1:j + 1, chans] = values[i, chans]
    return values, incidents


def simulate(n_devices: int = 200, duration_s: float = 3600.0, channels: int = 4, seed: int = 0,
             anomaly_rate: float = 1.0, start_ms: int = 1_767_225_600_000, mean_gap_s: float = 1.0,
             normal_prefix_s: float = 600.0) -> SimulatedStream:
    """Simulate ``n_devices`` devices for ``duration_s`` seconds from ``start_ms`` (epoch ms).

    ``anomaly_rate`` is the expected number of incidents per device per hour (Poisson), none in a device's
    first ``normal_prefix_s`` seconds, incidents on one device >= 3 min apart.  ``mean_gap_s`` is the
    fleet-wide mean gap between readings (each device runs 0.5x-2x that rate).
    """
    checks = {"n_devices": (n_devices, n_devices >= 1), "channels": (channels, channels >= 1),
              "duration_s": (duration_s, duration_s > 0), "mean_gap_s": (mean_gap_s, mean_gap_s > 0),
              "anomaly_rate": (anomaly_rate, anomaly_rate >= 0),
              "normal_prefix_s": (normal_prefix_s, normal_prefix_s >= 0)}
    for name, (value, ok) in checks.items():
        if not ok or not math.isfinite(value):
            msg = f"{name} out of range, got {value}"
            raise ConfigError(msg)
    width = max(4, len(str(n_devices - 1)))
    ids, dev_index, ts_parts, value_parts, incidents = [], [], [], [], []
    for d, child in enumerate(np.random.SeedSequence(seed).spawn(n_devices)):
        timing, *rngs = (np.random.default_rng(s) for s in child.spawn(4))
        ids.append(f"dev-{d:0{width}d}")
        t_ms = _reading_offsets_ms(timing, duration_s, mean_gap_s)
        values, found = _device(rngs, ids[-1], t_ms, channels, anomaly_rate, normal_prefix_s, start_ms)
        dev_index.append(np.full(len(t_ms), d))
        ts_parts.append(t_ms + start_ms)
        value_parts.append(values)
        incidents.extend(found)
    dev, ts = np.concatenate(dev_index), np.concatenate(ts_parts)
    order = np.lexsort((dev, ts))
    return SimulatedStream(np.array(ids, dtype=object)[dev[order]], ts[order],
                           np.concatenate(value_parts)[order].astype(np.float32),
                           tuple(sorted(incidents, key=lambda i: (i.start_ms, i.device_id))))
