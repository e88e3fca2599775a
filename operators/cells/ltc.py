"""Liquid time-constant (LTC) cell, Hasani et al. 2021, with the fused semi-implicit solver.

Each neuron's membrane potential ``v`` follows::

    cm dv/dt = gleak (vleak - v) + sum_j w_j s_j (erev_j - v)

over every synapse ``j`` into it: sensory synapses from the (affinely mapped) inputs and recurrent synapses
from all neurons (fully connected).  ``s_j = sigmoid(sigma_j (pre_j - mu_j))`` is the synapse's activation
and ``w_j > 0`` its maximal conductance.  Writing ``A = gleak vleak + sum w s erev`` and
``G = gleak + sum w s``, one step of ``dt`` is ``ode_unfolds`` sub-steps of ``e = dt / ode_unfolds``::

    v <- v + e (A - G v) / (cm + e G + epsilon)

with ``A`` and ``G`` taken at the current ``v``.  This is the ncps fused solver
``v <- (cm v + e A) / (cm + e G)`` rewritten as an increment so that ``dt = 0`` returns ``v`` bit for bit
(the multiplied-through quotient ``cm v / cm`` can be one ulp off).  For ``dt -> inf`` each sub-step
jumps to ``A / G`` at the current ``v``, a convex combination of ``vleak`` and the reversal potentials, so
the state stays finite and bounded for any finite ``dt``.  ``epsilon`` only guards the denominator.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from liquidstream.operators.cells._common import check_pair, check_sizes, check_step, inverse_softplus
from liquidstream.operators.cells.base import ContinuousCell
from liquidstream.operators.errors import ConfigError

INPUT_MAPPINGS = ("affine", "linear", "none")


def _uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape) * (high - low) + low


def _reversal(shape: tuple[int, ...]) -> torch.Tensor:
    # ncps FullyConnected wiring: polarity drawn from {-1, +1, +1} (two thirds excitatory).
    return torch.tensor([-1.0, 1.0, 1.0])[torch.randint(0, 3, shape)]


def _synapses(
    pre: torch.Tensor, sigma: torch.Tensor, offset: torch.Tensor, w_erev: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_pre w s erev, sum_pre w s)``, each ``[B, post]``, for presynaptic potentials ``[B, pre]``.

    ``s = sigmoid(sigma (pre - mu))`` with ``offset = -sigma mu``; synapse tensors are ``[pre, post]``.
    Elementwise products and a sum (no einsum/bmm): fastest for these small, many-row reductions.
    """
    s = torch.addcmul(offset, pre.unsqueeze(2), sigma).sigmoid_()  # [B, pre, post]; in place: no copy
    return (s * w_erev).sum(1), (s * w).sum(1)


class LTCCell(ContinuousCell):
    """Fully connected LTC cell; the hidden state is the membrane potential of ``hidden_size`` neurons.

    Conductances ``w``, leak ``gleak`` and capacitance ``cm`` are ``softplus`` of raw parameters, so they
    stay positive while training; initial ranges follow ncps.  With those, the resting time constants
    ``cm / G`` start near 0.1 s for 32 neurons, so after a gap of a second or more the state has relaxed to
    its fixed point whatever the gap was.  ``tau_init_min`` / ``tau_init_max`` (seconds, both or neither)
    instead scale ``cm`` so that the time constants at the typical initial conductance (``s = 1/2``,
    ``w = 1/2``) spread geometrically over that range (neuron 0 fastest), as :class:`LiquidCell` does; the
    time scale then matches streams read every few seconds.  ``input_mapping`` is ``"affine"``
    (``x * input_w + input_b``), ``"linear"`` (``x * input_w``) or ``"none"``.  A negative ``dt`` is
    treated as ``0``.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> cell = LTCCell(input_size=2, hidden_size=3)
    >>> x, h = torch.randn(2, 2), torch.zeros(2, 3)
    >>> h1 = cell(x, h, torch.tensor([0.0, 1e6]))    # dt = 0 and a very long gap
    >>> torch.equal(h1[0], h[0]), bool(torch.isfinite(h1).all())
    (True, True)
    >>> bool((cell.time_constants(x, h) > 0).all())
    True
    >>> cell.config()["kind"], cell.config()["ode_unfolds"]
    ('ltc', 6)
    """

    kind: ClassVar[str] = "ltc"
    ode_unfolds: int
    epsilon: float
    input_mapping: str
    sensory_mu: nn.Parameter
    sensory_sigma: nn.Parameter
    sensory_w_raw: nn.Parameter
    sensory_erev: nn.Parameter
    mu: nn.Parameter
    sigma: nn.Parameter
    w_raw: nn.Parameter
    erev: nn.Parameter
    gleak_raw: nn.Parameter
    vleak: nn.Parameter
    cm_raw: nn.Parameter
    input_w: nn.Parameter
    input_b: nn.Parameter

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        ode_unfolds: int = 6,
        epsilon: float = 1e-8,
        input_mapping: str = "affine",
        tau_init_min: float | None = None,
        tau_init_max: float | None = None,
    ) -> None:
        check_sizes(input_size, hidden_size)
        if isinstance(ode_unfolds, bool) or not isinstance(ode_unfolds, numbers.Integral) or ode_unfolds < 1:
            msg = f"ode_unfolds must be an int >= 1, got {ode_unfolds!r}"
            raise ConfigError(msg)
        if not (math.isfinite(epsilon) and epsilon >= 0):
            msg = f"epsilon must be a finite number >= 0, got {epsilon!r}"
            raise ConfigError(msg)
        if input_mapping not in INPUT_MAPPINGS:
            msg = f"input_mapping must be one of {INPUT_MAPPINGS}, got {input_mapping!r}"
            raise ConfigError(msg)
        if (tau_init_min, tau_init_max) != (None, None) and not (
            tau_init_min is not None and tau_init_max is not None and 0 < tau_init_min <= tau_init_max < math.inf
        ):
            msg = f"tau_init_min, tau_init_max: both None or 0 < min <= max (s), got {tau_init_min!r}, {tau_init_max!r}"
            raise ConfigError(msg)
        super().__init__(input_size, hidden_size)
        self.tau_init_min: float | None = tau_init_min
        self.tau_init_max: float | None = tau_init_max
        self.ode_unfolds = int(ode_unfolds)
        self.epsilon = float(epsilon)
        self.input_mapping = str(input_mapping)
        n_in, n = self.input_size, self.hidden_size
        self.sensory_mu = nn.Parameter(_uniform((n_in, n), 0.3, 0.8))
        self.sensory_sigma = nn.Parameter(_uniform((n_in, n), 3.0, 8.0))
        self.sensory_w_raw = nn.Parameter(inverse_softplus(_uniform((n_in, n), 0.001, 1.0)))
        self.sensory_erev = nn.Parameter(_reversal((n_in, n)))
        self.mu = nn.Parameter(_uniform((n, n), 0.3, 0.8))
        self.sigma = nn.Parameter(_uniform((n, n), 3.0, 8.0))
        self.w_raw = nn.Parameter(inverse_softplus(_uniform((n, n), 0.001, 1.0)))
        self.erev = nn.Parameter(_reversal((n, n)))
        self.gleak_raw = nn.Parameter(inverse_softplus(_uniform((n,), 0.001, 1.0)))
        self.vleak = nn.Parameter(_uniform((n,), -0.2, 0.2))
        self.cm_raw = nn.Parameter(inverse_softplus(_uniform((n,), 0.4, 0.6)))
        if tau_init_min is not None and tau_init_max is not None:
            g_typ = F.softplus(self.gleak_raw.detach()) + 0.25 * (n_in + n)  # E[w] E[s] per synapse
            tau = torch.logspace(math.log10(tau_init_min), math.log10(tau_init_max), n)
            self.cm_raw = nn.Parameter(inverse_softplus(tau * g_typ))
        if self.input_mapping != "none":
            self.input_w = nn.Parameter(torch.ones(n_in))
        if self.input_mapping == "affine":
            self.input_b = nn.Parameter(torch.zeros(n_in))

    def effective_parameters(self) -> dict[str, torch.Tensor]:
        """The constrained parameters the ODE uses (``cm``, ``gleak``, ``w``, ``sensory_w`` positive).

        Synapse tensors are ``[pre, post]``; ``cm``, ``gleak`` and ``vleak`` are ``[hidden_size]``.
        """
        return {
            "cm": F.softplus(self.cm_raw),
            "gleak": F.softplus(self.gleak_raw),
            "vleak": self.vleak,
            "w": F.softplus(self.w_raw),
            "mu": self.mu,
            "sigma": self.sigma,
            "erev": self.erev,
            "sensory_w": F.softplus(self.sensory_w_raw),
            "sensory_mu": self.sensory_mu,
            "sensory_sigma": self.sensory_sigma,
            "sensory_erev": self.sensory_erev,
        }

    def map_input(self, x: torch.Tensor) -> torch.Tensor:
        """The presynaptic potential of the sensory synapses, per ``input_mapping``."""
        if self.input_mapping != "none":
            x = x * self.input_w
        if self.input_mapping == "affine":
            x = x + self.input_b
        return x

    def forward(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """Advance each row ``i`` of ``h`` by ``dt[i]`` seconds (negative treated as 0)."""
        x, h, dt = check_step(x, h, dt, input_size=self.input_size, hidden_size=self.hidden_size)
        cm = F.softplus(self.cm_raw)
        gleak = F.softplus(self.gleak_raw)
        w = F.softplus(self.w_raw)
        w_erev, offset = w * self.erev, -(self.sigma * self.mu)
        num_s, den_s = self._sensory(x)
        a0 = gleak * self.vleak + num_s
        g0 = gleak + den_s
        e = (dt / self.ode_unfolds).unsqueeze(1)  # [B, 1]: each row its own sub-step
        v = h
        for _ in range(self.ode_unfolds):
            num, den = _synapses(v, self.sigma, offset, w_erev, w)
            g = g0 + den
            v = v + e * (a0 + num - g * v) / (cm + e * g + self.epsilon)
        return v

    def time_constants(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``cm / (gleak + sum of active conductances)`` at ``(x, h)``, seconds, ``[B, hidden_size]``."""
        x, h = check_pair(x, h, input_size=self.input_size, hidden_size=self.hidden_size)
        w = F.softplus(self.w_raw)
        _, den_s = self._sensory(x)
        _, den = _synapses(h, self.sigma, -(self.sigma * self.mu), w, w)
        return F.softplus(self.cm_raw) / (F.softplus(self.gleak_raw) + den_s + den + self.epsilon)

    def _sensory(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = F.softplus(self.sensory_w_raw)
        offset = -(self.sensory_sigma * self.sensory_mu)
        return _synapses(self.map_input(x), self.sensory_sigma, offset, w * self.sensory_erev, w)

    def config(self) -> dict[str, object]:
        """``{"kind": "ltc", ...constructor kwargs}``; ``build_cell(**cell.config())`` rebuilds it."""
        return {
            "kind": self.kind,
            **super().config(),
            "ode_unfolds": self.ode_unfolds,
            "epsilon": self.epsilon,
            "input_mapping": self.input_mapping,
            "tau_init_min": self.tau_init_min,
            "tau_init_max": self.tau_init_max,
        }
