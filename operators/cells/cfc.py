"""Closed-form continuous-time (CfC) cell, Hasani et al. 2022, as the ncps ``CfCCell``.

A backbone MLP reads ``concat(x, h)``; linear heads ``ff1``, ``ff2``, ``time_a``, ``time_b`` read the
backbone's output ``z``.  With ``t`` the row's own ``dt`` (shape ``[B, 1]``, never broadcast across rows)::

    t_interp = sigmoid(time_a(z) * t + time_b(z))
    default:  h_new = tanh(ff1(z)) * (1 - t_interp) + t_interp * tanh(ff2(z))
    no_gate:  h_new = tanh(ff1(z)) + t_interp * tanh(ff2(z))
    pure:     h_new = -A * exp(-t * (|w_tau| + |ff1(z)|)) * ff1(z) + A

The new state is a closed-form function of ``dt`` (no solver), so it is finite for any finite ``dt``;
unlike the ODE cells, ``dt = 0`` does not return ``h`` unchanged.  The four heads run as one fused matmul.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch
from torch import nn

from liquidstream.operators.cells._common import DerivedWeights, check_pair, check_sizes, check_step
from liquidstream.operators.cells.base import ContinuousCell
from liquidstream.operators.errors import ConfigError

MODES = ("default", "no_gate", "pure")
ACTIVATIONS = ("lecun_tanh", "silu")
#: ``time_constants`` never reports more than this many seconds (rates are clamped to ``1 / TAU_MAX``).
TAU_MAX = 1e6


class LeCunTanh(nn.Module):
    """``1.7159 * tanh(0.666 * x)`` (LeCun 1998), the ncps default backbone activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(0.666 * x)


class CfCCell(ContinuousCell):
    """CfC cell; ``mode`` is ``"default"``, ``"no_gate"`` or ``"pure"``.

    The backbone is ``backbone_layers`` blocks of ``Linear -> activation -> Dropout`` of width
    ``backbone_units`` (``backbone_layers = 0``: the heads read ``concat(x, h)`` directly).  Weights are
    Xavier-uniform as in ncps.  A negative ``dt`` is treated as ``0``.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> cell = CfCCell(input_size=2, hidden_size=3, backbone_units=8).eval()
    >>> x, h = torch.randn(2, 2), torch.zeros(2, 3)
    >>> cell(x, h, torch.tensor([0.1, 1e6])).shape
    torch.Size([2, 3])
    >>> cell.config()["mode"], cell.config()["backbone_units"]
    ('default', 8)
    >>> CfCCell(2, 3, mode="fancy")
    Traceback (most recent call last):
    ...
    liquidstream.operators.errors.ConfigError: mode must be one of ('default', 'no_gate', 'pure'), got 'fancy'
    """

    kind: ClassVar[str] = "cfc"
    w_tau: nn.Parameter
    A: nn.Parameter

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        backbone_units: int = 64,
        backbone_layers: int = 1,
        mode: str = "default",
        backbone_dropout: float = 0.0,
        backbone_activation: str = "lecun_tanh",
    ) -> None:
        check_sizes(input_size, hidden_size)
        if mode not in MODES:
            msg = f"mode must be one of {MODES}, got {mode!r}"
            raise ConfigError(msg)
        if backbone_activation not in ACTIVATIONS:
            msg = f"backbone_activation must be one of {ACTIVATIONS}, got {backbone_activation!r}"
            raise ConfigError(msg)
        for name, value, low in (
            ("backbone_units", backbone_units, 1),
            ("backbone_layers", backbone_layers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                msg = f"{name} must be an int >= {low}, got {value!r}"
                raise ConfigError(msg)
        if not (math.isfinite(backbone_dropout) and 0.0 <= backbone_dropout < 1.0):
            msg = f"backbone_dropout must be in [0, 1), got {backbone_dropout!r}"
            raise ConfigError(msg)
        super().__init__(input_size, hidden_size)
        self.backbone_units = int(backbone_units)
        self.backbone_layers = int(backbone_layers)
        self.mode = str(mode)
        self.backbone_dropout = float(backbone_dropout)
        self.backbone_activation = str(backbone_activation)

        layers: list[nn.Module] = []
        width = self.input_size + self.hidden_size
        for _ in range(self.backbone_layers):
            linear = nn.Linear(width, self.backbone_units)
            nn.init.xavier_uniform_(linear.weight)
            layers += [linear, LeCunTanh() if self.backbone_activation == "lecun_tanh" else nn.SiLU()]
            if self.backbone_dropout > 0:
                layers.append(nn.Dropout(self.backbone_dropout))
            width = self.backbone_units
        self.backbone = nn.Sequential(*layers)  # empty Sequential is the identity
        n_heads = 1 if self.mode == "pure" else 4  # ff1 | ff2 | time_a | time_b, stacked along the output
        self.n_heads = n_heads
        self.heads = nn.Linear(width, n_heads * self.hidden_size)
        with torch.no_grad():
            for i in range(n_heads):  # Xavier per head, as if each were its own Linear
                nn.init.xavier_uniform_(self.heads.weight[i * self.hidden_size : (i + 1) * self.hidden_size])
        if self.mode == "pure":
            self.w_tau = nn.Parameter(torch.zeros(self.hidden_size))
            self.A = nn.Parameter(torch.ones(self.hidden_size))
        self._column_weights = DerivedWeights()

    def _heads(self, x: torch.Tensor, h: torch.Tensor) -> list[torch.Tensor]:
        z: torch.Tensor = self.backbone(torch.cat((x, h), dim=1))
        out: torch.Tensor = self.heads(z)
        return list(out.chunk(self.n_heads, dim=1))

    def forward(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """New state after ``dt[i]`` seconds for each row ``i`` (negative treated as 0)."""
        x, h, dt = check_step(x, h, dt, input_size=self.input_size, hidden_size=self.hidden_size)
        t = dt.unsqueeze(1)  # [B, 1]
        if self.mode == "default" and not torch.is_grad_enabled() and not self.training:
            return self._serve(x, h, t)
        if self.mode == "pure":
            (ff1,) = self._heads(x, h)
            return -self.A * torch.exp(-t * (self.w_tau.abs() + ff1.abs())) * ff1 + self.A
        ff1, ff2, time_a, time_b = self._heads(x, h)
        ff1, ff2 = torch.tanh(ff1), torch.tanh(ff2)
        t_interp = torch.sigmoid(time_a * t + time_b)
        if self.mode == "no_gate":
            return ff1 + t_interp * ff2
        return ff1 * (1.0 - t_interp) + t_interp * ff2

    def _serve(self, x: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The default mode for serving (no autograd): the same function with fewer passes over memory.

        LeCun tanh's scales are folded into the weights (``1.7159 * tanh(0.666 * (W v + b))`` becomes
        ``tanh((0.666 W) v + 0.666 b)`` with 1.7159 folded into the next layer's weight), activations run
        in place, ``time_a * t + time_b`` is one ``addcmul`` and the gate one ``lerp``.  Results agree with
        :meth:`forward`'s autograd path to float32 rounding (a few ulp).
        """
        v = torch.cat((x, h), dim=1)
        carry = 1.0  # scale the previous activation left for the next layer's weight
        for layer in self.backbone:
            if isinstance(layer, nn.Linear):
                w, b = layer.weight * carry, layer.bias
                carry = 1.0
                if self.backbone_activation == "lecun_tanh":
                    v = torch.addmm(b * 0.666, v, (w * 0.666).t()).tanh_()
                    carry = 1.7159
                else:
                    v = torch.nn.functional.silu(torch.addmm(b, v, w.t()), inplace=True)
            # Dropout is the identity outside training; activations were applied with their Linear.
        w = self.heads.weight if carry == 1.0 else self.heads.weight * carry
        out = torch.addmm(self.heads.bias, v, w.t())
        n = self.hidden_size
        ff = out[:, : 2 * n].tanh_()
        gate = torch.addcmul(out[:, 3 * n :], out[:, 2 * n : 3 * n], t).sigmoid_()
        return torch.lerp(ff[:, :n], ff[:, n:], gate)

    def serves_columns(self) -> bool:
        """Whether :meth:`serve_columns` computes this cell (default mode, at least one backbone layer)."""
        return self.mode == "default" and self.backbone_layers > 0 and not self.training

    def serve_columns(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`_serve` for the step operator's layout; writes the new state [B, H] into ``out`` and returns it.

        ``x`` is ``[input_size + 1, B]``, features first, its last row all ones (the bias row); ``h`` and ``out``
        are ``[B, H]`` rows with any row stride (column views of the state store's packed blocks).  Everything
        runs transposed, features first: the first layer reads ``h`` and ``x`` through two matmuls instead of a
        concatenated copy, every bias rides in a matmul as a column against a row of ones (no broadcast copy of
        the bias per row), and the gate's elementwise work runs on contiguous rows.  Same function as
        :meth:`forward` (float32 rounding aside).
        """
        lecun = self.backbone_activation == "lecun_tanh"
        weights = self.column_weights()
        batch = h.shape[0]
        v = x
        for k, w in enumerate(weights[1:-1]):  # [units, width + 1] per layer, bias last (first: x part only)
            units = w.shape[0]
            nxt = torch.empty(units + 1, batch, dtype=x.dtype, device=x.device)
            nxt[units] = 1.0  # the next matmul's bias row
            if k == 0:  # reads concat(x, h): one matmul per part
                torch.mm(weights[0], h.t(), out=nxt[:units])
                nxt[:units].addmm_(w, x)
            else:
                torch.mm(w, v, out=nxt[:units])
            if lecun:
                nxt[:units].tanh_()
            else:
                torch.nn.functional.silu(nxt[:units], inplace=True)
            v = nxt
        o = torch.mm(weights[-1], v)  # [4H, B]
        n = self.hidden_size
        ff = o[: 2 * n].tanh_()
        gate = o[3 * n :].addcmul_(o[2 * n : 3 * n], dt.clamp(min=0.0).unsqueeze(0)).sigmoid_()
        # Contiguous, then one transposed copy: lerp writing straight into the strided rows is 2x slower.
        return out.copy_(torch.lerp(ff[:n], ff[n:], gate).t())

    def column_weights(self) -> list[torch.Tensor]:
        """The weights :meth:`serve_columns` multiplies by (cached; rebuilt when a parameter changes): the first
        layer's ``h`` part, then per layer ``[W | b]`` (the first layer's ``x`` part), then the heads' ``[W | b]``,
        LeCun tanh's scales folded in.  The compiled step (:mod:`liquidstream.operators.compiled`) reads them too."""
        return self._column_weights.get(list(self.parameters()), self._build_column_weights)

    def _build_column_weights(self) -> list[torch.Tensor]:
        """:meth:`serve_columns`' weights: the first layer's ``h`` part, then per layer ``[W | b]`` (the first
        layer's ``x`` part), then the heads' ``[W | b]``; LeCun tanh's scales folded in as in :meth:`_serve`."""
        pre = 0.666 if self.backbone_activation == "lecun_tanh" else 1.0
        carry, n_in, out = 1.0, self.input_size, []
        for k, layer in enumerate(layer for layer in self.backbone if isinstance(layer, nn.Linear)):
            w = torch.cat([layer.weight * carry, layer.bias.unsqueeze(1)], dim=1) * pre  # bias as a last column
            if k == 0:
                out.append(w[:, n_in : n_in + self.hidden_size].contiguous())
                w = torch.cat([w[:, :n_in], w[:, -1:]], dim=1)
            out.append(w)
            carry = 1.7159 if pre != 1.0 else 1.0
        out.append(torch.cat([self.heads.weight * carry, self.heads.bias.unsqueeze(1)], dim=1))
        return out

    def time_constants(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Seconds, ``[B, hidden_size]``: ``1 / |time_a|`` (gate time scale), pure: ``1 / (|w_tau| + |ff1|)``.

        Rates below ``1 / TAU_MAX`` are clamped, so the result lies in ``(0, TAU_MAX]``.
        """
        x, h = check_pair(x, h, input_size=self.input_size, hidden_size=self.hidden_size)
        heads = self._heads(x, h)
        rate = self.w_tau.abs() + heads[0].abs() if self.mode == "pure" else heads[2].abs()
        return 1.0 / rate.clamp(min=1.0 / TAU_MAX)

    def config(self) -> dict[str, object]:
        """``{"kind": "cfc", ...constructor kwargs}``; ``build_cell(**cell.config())`` rebuilds it."""
        return {
            "kind": self.kind,
            **super().config(),
            "backbone_units": self.backbone_units,
            "backbone_layers": self.backbone_layers,
            "mode": self.mode,
            "backbone_dropout": self.backbone_dropout,
            "backbone_activation": self.backbone_activation,
        }
