"""The irregular-sampling study's models (:mod:`liquidstream.pipeline.eval.irregular.study`): the production forecaster
around a CfC
or LTC cell, or around :class:`GRUGapCell` (a discrete GRU given the gap only as an input feature); the
``mse`` objective's frozen spread (:func:`fix_spread`); and the gap-blind view of a stream (:func:`gap_blind`).
"""

from __future__ import annotations

import torch
from torch import nn

from liquidstream.operators import Forecaster
from liquidstream.operators.cells.base import ContinuousCell
from liquidstream.operators.training import Sequences

#: LTC's initial time constants in seconds (``LTCCell`` ``tau_init_min/max``), on the gaps' scale: with ncps's
#: (~0.1 s) the state relaxes within every gap, so the gap cannot matter (docs/evaluation.md, section 2).
LTC_TAU_INIT_S = (1.0, 10.0)


class GRUGapCell(ContinuousCell):
    """A discrete GRU behind the cell interface: the gap reaches it only as an input feature.

    :class:`~liquidstream.operators.forecaster.Forecaster` appends ``log1p(dt)`` to every cell input, so this GRU is
    "given the gap as an input" while its state update has no notion of elapsed time.

    >>> cell = GRUGapCell(input_size=3, hidden_size=4)
    >>> cell(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([1.0, 5.0])).shape
    torch.Size([2, 4])
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.gru = nn.GRUCell(input_size, hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.gru(x, h)
        return out

    def time_constants(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(h)  # one step, whatever the gap: a discrete cell has no time constant in seconds


def build_model(kind: str, n_channels: int, hidden_size: int, *, absolute_head: bool = False) -> Forecaster:
    """A study model (the irregular study's forecasters have no absolute head: the study predates it and
    measures the delta forecast only; the detection ablations ask for one)."""
    if kind == "gru":
        model = Forecaster(n_channels=n_channels, hidden_size=hidden_size, cell="liquid", absolute_head=absolute_head)
        model.cell = GRUGapCell(n_channels + 1, hidden_size)  # same head, same dt feature, discrete state
        return model
    options: dict[str, object] = ({"backbone_units": hidden_size} if kind == "cfc" else
                                  {"tau_init_min": LTC_TAU_INIT_S[0], "tau_init_max": LTC_TAU_INIT_S[1]})
    return Forecaster(n_channels=n_channels, hidden_size=hidden_size, cell=kind, cell_options=options,
                      absolute_head=absolute_head)


def fix_spread(model: Forecaster) -> Forecaster:
    """Freeze the head's spread outputs at their initial value (unit std), so the production trainer's
    Gaussian NLL becomes squared error / 2 (plus a constant): the ``mse`` objective.

    The head's last layer starts at zero and its spread rows get zero gradients, so Adam never moves them.

    >>> m = fix_spread(build_model("cfc", 1, 4))
    >>> _, sd = m.forecast(torch.zeros(1, 4), torch.zeros(1, 1), torch.tensor([3.0]))
    >>> round(float(sd.detach()), 3)
    1.05
    """
    last = model.head[-1]
    if isinstance(last, nn.Linear):
        keep = torch.ones(last.out_features, 1)
        keep[model.n_channels:] = 0.0  # rows [C:2C] produce the log-spread
        last.weight.register_hook(lambda g: g * keep.to(g.device))  # type: ignore[no-untyped-call]
        last.bias.register_hook(lambda g: g * keep[:, 0].to(g.device))  # type: ignore[no-untyped-call]
    return model


def gap_blind(seqs: Sequences) -> Sequences:
    """The same readings with every gap replaced by the nominal period (1 s); first readings keep dt = 0."""
    dt = torch.where(seqs.mask & (seqs.dt > 0), torch.ones_like(seqs.dt), torch.zeros_like(seqs.dt))
    return Sequences(seqs.device_ids, seqs.values, dt, seqs.mask)
