"""Forecast at any instant: a device's next reading as the operator would forecast it at time ``ts``.

:func:`forecast_reading` is step 1 of the fused wave step (:func:`~liquidstream.operators.fused_step.run_wave`
calls it): the forecast of a reading from the state before it, at the real gap.  :func:`forecast_at` asks the
same question without a reading: it plans the instant with the batch planner
(:func:`~liquidstream.operators.waves.plan_waves`: the gap in seconds, the long-gap policies), gathers copies of the
devices' rows and runs :func:`forecast_reading` on them, so the answer is the forecast the next reading would be
scored against if it arrived at ``ts``, and nothing in the store changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.errors import DeviceQueryError
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.normalization import CLIP_Z, scale
from liquidstream.operators.state.store import DeviceStateStore
from liquidstream.operators.waves import plan_waves

__all__ = ["InstantForecast", "forecast_at", "forecast_reading"]


def forecast_reading(model: Forecaster, h: torch.Tensor, x_last: torch.Tensor, mean: torch.Tensor,
                     var: torch.Tensor, dt: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The forecast of a reading ``dt`` [B] seconds after the last one, channels first: ``h`` [B, H] rows,
    ``x_last``, ``mean``, ``var`` [C, B] raw units.  Returns the delta forecast and its spread in normalised
    units, the absolute forecast (None without ``absolute_head``) and the normalising scale, all [C, B]; in raw
    units the forecast is ``mean + mu * scale``.

    >>> model = Forecaster(n_channels=1, hidden_size=4)
    >>> with torch.no_grad():
    ...     mu, sd, ab, sc = forecast_reading(model, torch.zeros(1, 4), torch.tensor([[12.0]]),
    ...                                       torch.tensor([[10.0]]), torch.tensor([[4.0]]), torch.tensor([1.0]))
    >>> round(float(10.0 + mu * sc), 4), round(float(sd), 4)  # an untrained model: persistence, unit spread
    (12.0, 1.05)
    """
    sc = scale(mean, var)
    last_z = (x_last - mean) / sc
    last_in = torch.clamp(last_z, -CLIP_Z, CLIP_Z)  # the network's input is clipped, the delta's skip is not:
    mu, sd, ab = model.forecast_columns_all(h, last_in, dt)
    mu = mu + (last_z - last_in)  # a reading far out (a drifted level) is forecast from where it really is
    return mu, sd, ab, sc


@dataclass(frozen=True)
class InstantForecast:
    """The answer of :func:`forecast_at` for N devices (C channels), in the order asked."""

    device_ids: list[str]
    ts_ms: np.ndarray  # int64 [N]: the instant, epoch ms
    last_ts_ms: np.ndarray  # int64 [N]: the device's last applied reading, epoch ms
    readings: np.ndarray  # int64 [N]: readings applied so far
    dt_s: np.ndarray  # float32 [N]: the gap a reading at ts_ms would be stepped by, seconds (after the gap policy)
    long_gap: np.ndarray  # bool [N]: that gap exceeds max_gap_s
    forecast: np.ndarray  # float32 [N, C]: the forecast of a reading at ts_ms, raw units
    forecast_std: np.ndarray  # float32 [N, C]: its spread, raw units (calibrated as a prediction's forecast_std)
    normal_level: np.ndarray  # float32 [N, C]: the device's running mean per channel, raw units
    normal_spread: np.ndarray  # float32 [N, C]: the device's running standard deviation per channel, raw units
    alert_open: np.ndarray  # bool [N]: an alert is open on the device
    alert_opened_ms: np.ndarray  # int64 [N]: event time of the reading that opened it (0: none open)
    model_version: str


def _check(store: DeviceStateStore, device_ids: Sequence[str], ts_ms: np.ndarray) -> np.ndarray:
    if len(set(device_ids)) != len(device_ids):
        dup = next(d for i, d in enumerate(device_ids) if d in device_ids[:i])
        msg = f"device {dup!r} is asked for twice in one query"
        raise DeviceQueryError(msg, dup, "invalid")
    rows = store.lookup(device_ids)
    count, last = store.host["count"], store.host["last_ts_ms"]
    for i, (d, row) in enumerate(zip(device_ids, rows.tolist(), strict=True)):
        if row < 0:
            msg = f"device {d!r} is unknown to this operator"
            raise DeviceQueryError(msg, d, "unknown")
        if count[row] == 0:
            msg = f"device {d!r} has no reading yet"
            raise DeviceQueryError(msg, d, "no_reading")
        if ts_ms[i] < last[row]:
            msg = f"device {d!r}: instant {int(ts_ms[i])} ms is before its last reading at {int(last[row])} ms"
            raise DeviceQueryError(msg, d, "before_last_reading")
    return rows


@torch.no_grad()
def forecast_at(model: Forecaster, store: DeviceStateStore, settings: OperatorSettings, model_version: str,
                device_ids: Sequence[str], ts_ms: np.ndarray | Sequence[int]) -> InstantForecast:
    """Each device's forecast at its instant ``ts_ms`` (int64 epoch ms [N], at or after its last reading);
    reads the store, never writes it.  Unknown devices, devices without a reading and instants before the last
    reading raise :class:`~liquidstream.operators.errors.DeviceQueryError` naming the device."""
    ts = np.asarray(ts_ms, dtype=np.int64).reshape(-1)
    if ts.shape != (len(device_ids),):
        msg = f"expected {len(device_ids)} instants, got {ts.shape[0]}"
        raise DeviceQueryError(msg, device_ids[0] if device_ids else "", "invalid")
    rows = _check(store, device_ids, ts)
    host = store.host
    # The planner's gap and policies, on copies of the host clocks (plan_waves never writes its inputs).
    plan = plan_waves(rows, ts, host["last_ts_ms"], host["count"], settings)
    dt_s = np.zeros(len(device_ids), np.float32)  # in input order; a reading at the last instant: dt 0
    applied = plan.source  # a duplicate dropped by the policy is not applied: its gap stays 0
    dt_s[applied] = plan.dt_s
    idx = torch.as_tensor(rows, device=store.device)
    gathered = store.gather(idx)  # copies
    field = store.field
    x_last, mean, var = (field(gathered, n).t() for n in ("x_last", "mean", "var"))
    calib = field(gathered, "calib").t()
    dt = torch.from_numpy(dt_s).to(store.device)
    mu, sd, _, sc = forecast_reading(model, field(gathered, "h"), x_last, mean, var, dt)
    forecast = torch.addcmul(mean, mu, sc)
    std = sd * sc * torch.sqrt(calib)  # as a prediction's forecast_std
    open_ = field(gathered, "alert_open").cpu().numpy().astype(bool)
    return InstantForecast(
        device_ids=list(device_ids), ts_ms=ts, last_ts_ms=host["last_ts_ms"][rows].copy(),
        readings=host["count"][rows].astype(np.int64), dt_s=dt_s, long_gap=plan.long_gap,
        forecast=forecast.t().cpu().numpy(), forecast_std=std.t().cpu().numpy(),
        normal_level=mean.t().cpu().numpy(), normal_spread=torch.sqrt(var).t().cpu().numpy(), alert_open=open_,
        alert_opened_ms=np.where(open_, host["alert_open_ms"][rows], 0).astype(np.int64), model_version=model_version)
