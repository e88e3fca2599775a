"""The forecaster: a continuous-time cell plus a Gaussian head over the time to the next reading.

All quantities inside are in per-device normalised units (see :mod:`liquidstream.operators.normalization`):

* ``advance(h, x, dt)`` folds a reading into the hidden state after a gap of ``dt`` seconds;
* ``forecast(h, x_last, dt)`` predicts the mean and standard deviation, per channel, of the reading that
  arrives ``dt`` seconds after the last one.  The mean is the last reading plus a learned correction
  (the *delta* forecast), which keeps a briefly trained model honest (it never does worse than persistence
  by much);
* with ``absolute_head`` (the default) the same head also predicts the next reading *absolutely*, with no
  skip from the last value (:meth:`Forecaster.forecast_all`).  Trained on normal operation only, it forecasts
  what normal looks like from the hidden state: while a device is in a state outside its normal operating
  region (a collective anomaly) its residual stays large for as long as the state lasts, where the delta
  forecast follows the new state after one reading and only marks the onset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from liquidstream.operators.cells import CfCCell, build_cell
from liquidstream.operators.cells._common import DerivedWeights
from liquidstream.operators.errors import ConfigError


def _dt_feature(dt: torch.Tensor) -> torch.Tensor:
    """log1p of the gap in seconds, [B] -> [B, 1]; compresses gaps from ms to days into a small range."""
    return torch.log1p(torch.clamp(dt, min=0.0)).unsqueeze(1)


def _features_columns(x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``[x; dt feature; 1]`` channels first, [C, B] and [B] -> [C + 2, B] (the ones row carries a bias)."""
    c = x.shape[0]
    out = torch.empty(c + 2, x.shape[1], dtype=x.dtype, device=x.device)
    out[:c] = x
    torch.log1p(torch.clamp(dt, min=0.0), out=out[c])  # as _dt_feature
    out[c + 1] = 1.0
    return out


class Forecaster(nn.Module):
    """A cell and a head; hyperparameters kept as given so :meth:`config` can rebuild the model.

    >>> model = Forecaster(n_channels=3, hidden_size=8, cell="liquid")
    >>> h = model.initial_state(2)
    >>> x = torch.zeros(2, 3)
    >>> h = model.advance(h, x, torch.tensor([1.0, 0.5]))
    >>> mean, std = model.forecast(h, x, torch.tensor([1.0, 2.0]))
    >>> mean.shape, bool((std > 0).all())
    (torch.Size([2, 3]), True)
    >>> model.forecast_all(h, x, torch.tensor([1.0, 2.0]))[2].shape  # the absolute forecast
    torch.Size([2, 3])
    """

    def __init__(self, n_channels: int, hidden_size: int = 64, cell: str = "cfc",
                 cell_options: dict[str, object] | None = None, head_units: int = 64,
                 min_std: float = 0.05, absolute_head: bool = True, time_scale_s: float = 1.0) -> None:
        super().__init__()
        if n_channels < 1 or hidden_size < 1 or head_units < 1:
            msg = f"n_channels, hidden_size and head_units must be >= 1, got {n_channels}, {hidden_size}, {head_units}"
            raise ConfigError(msg)
        if not min_std > 0:
            msg = f"min_std must be > 0, got {min_std}"
            raise ConfigError(msg)
        if not (math.isfinite(time_scale_s) and time_scale_s > 0):
            msg = f"time_scale_s must be a finite number of seconds > 0, got {time_scale_s}"
            raise ConfigError(msg)
        self.n_channels = n_channels
        self.hidden_size = hidden_size
        self.cell_kind = cell
        self.cell_options = dict(cell_options or {})
        self.head_units = head_units
        self.min_std = min_std
        self.absolute_head = bool(absolute_head)
        #: The model's unit of time, seconds: the cell and the head see every gap as ``dt / time_scale_s``.
        #: A cell's gates and time constants are initialised for gaps of about one unit (a CfC gate is
        #: ``sigmoid(a * t + b)`` with ``a`` of order 1), so a 5-minute or hourly stream measured in seconds
        #: saturates them and trains badly; training sets it to the typical gap of its data
        #: (:meth:`~liquidstream.operators.training.Sequences.typical_gap_s`).  Gaps stay real: a gap twice
        #: as long advances the state twice as far.
        self.time_scale_s = float(time_scale_s)
        self.cell = build_cell(cell, input_size=n_channels + 1, hidden_size=hidden_size, **self.cell_options)
        # Last layer outputs: correction [0, C) | spread [C, 2C) | absolute forecast [2C, 3C) (with absolute_head).
        outputs = (3 if self.absolute_head else 2) * n_channels
        self.head = nn.Sequential(
            nn.Linear(hidden_size + n_channels + 1, head_units), nn.SiLU(), nn.Linear(head_units, outputs))
        self._head_weights = DerivedWeights()  # forecast_columns' split first layer
        # Start as persistence with unit spread (the correction and log-std outputs begin at zero); the
        # absolute forecast starts at 0, the device's normal level in normalised units.
        last = self.head[-1]
        if isinstance(last, nn.Linear):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def config(self) -> dict[str, object]:
        return {"n_channels": self.n_channels, "hidden_size": self.hidden_size, "cell": self.cell_kind,
                "cell_options": self.cell_options, "head_units": self.head_units, "min_std": self.min_std,
                "absolute_head": self.absolute_head, "time_scale_s": self.time_scale_s}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Forecaster:
        """The architecture :meth:`config` describes.  A config written before ``absolute_head`` existed
        (no such key) describes a model without it, so its saved weights still load; one written before
        ``time_scale_s`` measured time in seconds (scale 1).

        >>> Forecaster.from_config({"n_channels": 2, "hidden_size": 4}).absolute_head
        False
        """
        return cls(**{"absolute_head": False, **config})

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(batch, self.hidden_size, device=device)

    def model_time(self, dt: torch.Tensor) -> torch.Tensor:
        """Gaps in seconds as the cell and head see them (units of ``time_scale_s``)."""
        return dt if self.time_scale_s == 1.0 else dt / self.time_scale_s

    def advance(self, h: torch.Tensor, x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Hidden state after reading ``x`` [B, C] arrived ``dt`` [B] seconds after the previous one."""
        t = self.model_time(dt)
        h_new: torch.Tensor = self.cell(torch.cat([x, _dt_feature(t)], dim=1), h, t)
        return h_new

    def forecast(self, h: torch.Tensor, x_last: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std [B, C] of the reading ``dt`` [B] seconds after ``x_last`` [B, C] (the delta forecast)."""
        mean, std, _ = self.forecast_all(h, x_last, dt)
        return mean, std

    def forecast_all(self, h: torch.Tensor, x_last: torch.Tensor, dt: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`forecast` plus the absolute forecast [B, C] of the same reading (None without
        ``absolute_head``), all from one pass of the head."""
        out = self.head(torch.cat([h, x_last, _dt_feature(self.model_time(dt))], dim=1))
        c = self.n_channels
        std = self.min_std + F.softplus(out[:, c:2 * c] + 0.5413)  # softplus(0.5413) = 1: unit std at init
        return x_last + out[:, :c], std, out[:, 2 * c:3 * c] if self.absolute_head else None

    def advance_columns(self, h: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, out: torch.Tensor) -> None:
        """:meth:`advance` in the step operator's layout: ``x`` [C, B] channels first, ``h`` and ``out`` [B, H]
        rows (any row stride; ``out`` receives the new state)."""
        t = self.model_time(dt)
        xd = _features_columns(x, t)
        cell = self.cell
        if isinstance(cell, CfCCell) and cell.serves_columns():
            cell.serve_columns(xd, h, t, out)
        else:
            out.copy_(cell(xd[:-1].t(), h, t))

    def forecast_columns(self, h: torch.Tensor, x_last: torch.Tensor,
                         dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forecast` in the step operator's layout (see :meth:`forecast_columns_all`)."""
        mean, std, _ = self.forecast_columns_all(h, x_last, dt)
        return mean, std

    def forecast_columns_all(self, h: torch.Tensor, x_last: torch.Tensor, dt: torch.Tensor,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`forecast_all` in the step operator's layout: ``h`` [B, H] rows (any row stride), ``x_last``
        [C, B] channels first; mean, std and the absolute forecast come back [C, B].  The head runs transposed,
        as two matmuls on the parts of its input instead of one on a concatenated copy, the first bias inside
        the second matmul (against a row of ones); float32 rounding aside, the same function."""
        layers = tuple(self.head)  # (Sequential indexing costs more than the small matmuls below)
        first, act, last = layers if len(layers) == 3 else (None, None, None)
        if not (isinstance(first, nn.Linear) and isinstance(act, nn.SiLU) and isinstance(last, nn.Linear)):
            mean, std, absolute = self.forecast_all(h, x_last.t(), dt)  # a head built otherwise (never by this class)
            return mean.t(), std.t(), None if absolute is None else absolute.t()
        n_h, c = self.hidden_size, self.n_channels
        w_h, w_x, b_out = self._head_weights.get([first.weight, first.bias, last.bias], lambda: [
            first.weight[:, :n_h].contiguous(), torch.cat([first.weight[:, n_h:], first.bias.unsqueeze(1)], dim=1),
            last.bias.unsqueeze(1)])
        a = torch.mm(w_h, h.t())
        a.addmm_(w_x, _features_columns(x_last, self.model_time(dt)))
        out = torch.addmm(b_out, last.weight, F.silu(a, inplace=True))  # [2C or 3C, B]: one matmul for all heads
        std = self.min_std + F.softplus(out[c:2 * c] + 0.5413)
        return x_last + out[:c], std, out[2 * c:3 * c] if self.absolute_head else None

    def time_constants(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Effective time constant per neuron in seconds, for interpretability."""
        tau: torch.Tensor = self.cell.time_constants(torch.cat([x, _dt_feature(self.model_time(dt))], dim=1), h)
        return tau * self.time_scale_s


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element Gaussian negative log-likelihood without the constant, same shape as ``x``."""
    z = (x - mean) / std
    return 0.5 * z * z + torch.log(std)
