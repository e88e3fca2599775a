"""A leaky continuous-time RNN cell with learnable per-neuron time constants.

The hidden state follows the ODE ``dh/dt = (-h + f) / tau`` with target ``f = tanh(W x + U h + b)``.
One step holds ``f`` fixed over the step and integrates exactly (exponential integrator)::

    h_new = h + (f - h) * (1 - exp(-dt / tau))

which equals ``f + (h - f) * exp(-dt / tau)`` but is written so that ``dt = 0`` returns ``h`` bit for bit,
and never overshoots ``f`` however large ``dt`` is (``dt >> tau`` gives ``f``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from liquidstream.operators.cells._common import check_pair, check_sizes, check_step, inverse_softplus
from liquidstream.operators.cells.base import ContinuousCell
from liquidstream.operators.errors import ConfigError


class LiquidCell(ContinuousCell):
    """Continuous-time RNN cell, ``dh/dt = (-h + tanh(W x + U h + b)) / tau``, exact for fixed input.

    ``tau = softplus(tau_raw) + tau_min`` per neuron (seconds), so it stays strictly above ``tau_min``
    while training.  At initialisation the time constants are spread geometrically over
    ``[tau_init_min, tau_init_max]`` (neuron 0 fastest).  A negative ``dt`` is treated as ``0``.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> cell = LiquidCell(input_size=3, hidden_size=4)
    >>> x, h = torch.randn(2, 3), torch.zeros(2, 4)
    >>> h1 = cell(x, h, torch.tensor([0.0, 0.5]))    # a different dt per row
    >>> h1.shape
    torch.Size([2, 4])
    >>> torch.equal(h1[0], h[0])                      # dt = 0 leaves the state unchanged
    True
    >>> cell.time_constants(x, h)[0]
    tensor([ 1.0000,  2.1544,  4.6416, 10.0000], grad_fn=<SelectBackward0>)
    >>> cell.config()  # doctest: +NORMALIZE_WHITESPACE
    {'kind': 'liquid', 'input_size': 3, 'hidden_size': 4,
     'tau_min': 0.01, 'tau_init_min': 1.0, 'tau_init_max': 10.0}
    """

    kind: ClassVar[str] = "liquid"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        tau_min: float = 0.01,
        tau_init_min: float = 1.0,
        tau_init_max: float = 10.0,
    ) -> None:
        check_sizes(input_size, hidden_size)
        if not (math.isfinite(tau_min) and tau_min > 0):
            msg = f"tau_min must be a finite number > 0 seconds, got {tau_min!r}"
            raise ConfigError(msg)
        if not (math.isfinite(tau_init_max) and tau_min < tau_init_min <= tau_init_max):
            msg = (
                "need tau_min < tau_init_min <= tau_init_max (finite, seconds), got "
                f"{tau_min!r}, {tau_init_min!r}, {tau_init_max!r}"
            )
            raise ConfigError(msg)
        super().__init__(input_size, hidden_size)
        self.tau_min = float(tau_min)
        self.tau_init_min = float(tau_init_min)
        self.tau_init_max = float(tau_init_max)
        #: ``W x + b``
        self.input_map = nn.Linear(self.input_size, self.hidden_size)
        #: ``U h`` (no bias: ``b`` lives in ``input_map``)
        self.recurrent = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        tau0 = torch.logspace(
            math.log10(self.tau_init_min),
            math.log10(self.tau_init_max),
            self.hidden_size,
            dtype=torch.float64,
        )
        self.tau_raw = nn.Parameter(inverse_softplus(tau0 - self.tau_min).to(torch.get_default_dtype()))

    def tau(self) -> torch.Tensor:
        """Per-neuron time constant in seconds, shape ``[hidden_size]``, always ``> tau_min``."""
        return F.softplus(self.tau_raw) + self.tau_min

    def target(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The state the neurons relax towards, ``tanh(W x + U h + b)``, shape ``[B, hidden_size]``."""
        pre: torch.Tensor = self.input_map(x) + self.recurrent(h)
        return torch.tanh(pre)

    def forward(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Advance each row ``i`` of ``h`` by ``dt[i]`` seconds (negative treated as 0)."""
        x, h, dt = check_step(x, h, dt, input_size=self.input_size, hidden_size=self.hidden_size)
        f = self.target(x, h)
        # 1 - exp(-dt/tau) via expm1: exactly 0 at dt = 0, accurate for dt << tau, 1 for dt >> tau.
        gain = -torch.expm1(-dt.unsqueeze(1) / self.tau())
        return h + (f - h) * gain

    def time_constants(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``tau`` for every row, shape ``[B, hidden_size]`` (state independent for this cell)."""
        x, h = check_pair(x, h, input_size=self.input_size, hidden_size=self.hidden_size)
        return self.tau().unsqueeze(0).expand(x.shape[0], -1).contiguous()

    def config(self) -> dict[str, object]:
        """``{"kind": "liquid", ...constructor kwargs}``; ``build_cell(**cell.config())`` rebuilds it."""
        return {
            "kind": self.kind,
            **super().config(),
            "tau_min": self.tau_min,
            "tau_init_min": self.tau_init_min,
            "tau_init_max": self.tau_init_max,
        }
