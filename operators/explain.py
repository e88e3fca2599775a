"""Alerts that explain themselves: for each channel an alert blames, the reading, what was expected at that
instant and how widely, how far out it was; and how fast the device's state forgets at that moment.

Computed for the readings that open an alert only (rare), after the batch, from rows the wave step already wrote
(:class:`~liquidstream.operators.layout.OutputRows` ``expected``, ``expected_std``, ``z``) and from the cell:

* ``expected`` / ``spread``: per channel, what the detector measured the reading against, from the state before
  the reading: the forecast at its real gap (delta head), the absolute forecast, or the normal level (level rule),
  whichever residual was the largest in the detector's own units, and that likelihood's residual scale, both in
  raw units;
* ``z``: ``|reading - expected| / spread``, the standardised deviation the detector saw (inf: a stuck channel);
* ``time_constants_s``: the cell's effective time constant per hidden unit (seconds), summarised as min / median /
  max: a short one forgets within a reading or two, a long one carries the device's history across hours
  (:meth:`Forecaster.time_constants`, at the alerting reading and the device's usual gap).  The state they are
  taken from is the device's at the end of the batch that opened the alert: the state at the reading itself when
  that reading is the device's last in its batch (as in a live stream), a few readings later in a backlog.  So they
  alone among an alert's fields can differ between two batchings of the same stream.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.layout import OutputRows
from liquidstream.operators.normalization import CLIP_Z, scale
from liquidstream.operators.result import Alert, ChannelWhy, Explanation
from liquidstream.operators.state.store import DeviceStateStore

__all__ = ["explain"]


def _sig(x: float) -> float:
    """4 significant digits: an explanation is read by people."""
    return float(f"{x:.4g}") if np.isfinite(x) else x


@torch.no_grad()
def explain(alerts: list[Alert], model: Forecaster, store: DeviceStateStore, values: np.ndarray, res_f: np.ndarray,
            rows_of: dict[int, int]) -> list[Alert]:
    """``alerts`` (opened in this batch, ``index`` into ``values`` [N, C] and ``res_f`` [N, rows]) with their
    :class:`Explanation`; ``rows_of``: input position -> store row.  Reads the state, changes nothing."""
    if not alerts:
        return alerts
    layout = OutputRows(model.n_channels)
    idx = [a.index for a in alerts]
    rows = torch.as_tensor([rows_of[i] for i in idx], device=store.tensors["h"].device)
    t = store.tensors
    h = t["h"][rows].float()
    mean, var = t["mean"][rows].float(), t["var"][rows].float()
    x = torch.as_tensor(values[idx], device=h.device)
    x_n = ((x - mean) / scale(mean, var)).clamp(-CLIP_Z, CLIP_Z)  # the cell's input (with today's statistics)
    gap = torch.as_tensor(res_f[idx, layout.horizon], device=h.device).nan_to_num(1.0).clamp(min=1e-3)
    tau = model.time_constants(x_n, h, gap).cpu().numpy()
    out = []
    for j, a in enumerate(alerts):
        i = a.index
        why = tuple(ChannelWhy(ch, _sig(float(values[i, ch])), _sig(float(res_f[i, layout.expected][ch])),
                               _sig(float(res_f[i, layout.expected_std][ch])), _sig(float(res_f[i, layout.z][ch])))
                    for ch in a.channels)
        taus = (_sig(float(tau[j].min())), _sig(float(np.median(tau[j]))), _sig(float(tau[j].max())))
        out.append(dataclasses.replace(a, explanation=Explanation(why, taus)))
    return out
