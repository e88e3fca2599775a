"""The contract every continuous-time cell satisfies.

A cell advances a batch of hidden states by a *per-row* time step::

    h_new = cell(x, h, dt)      # x: [B, input_size], h: [B, hidden_size], dt: [B] seconds (float)

Row ``i`` of the result depends only on row ``i`` of the inputs: the batched call equals calling the cell
one row at a time.  ``dt`` is never broadcast across the hidden axis.
"""

from __future__ import annotations

import torch
from torch import nn


class ContinuousCell(nn.Module):
    """Base class: subclasses implement :meth:`forward` and :meth:`time_constants`."""

    input_size: int
    hidden_size: int

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def time_constants(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Effective time constant of each neuron in seconds, shape ``[B, hidden_size]``."""
        raise NotImplementedError

    def config(self) -> dict[str, object]:
        """Constructor keyword arguments, JSON-serialisable, so a saved model can be rebuilt."""
        return {"input_size": self.input_size, "hidden_size": self.hidden_size}
