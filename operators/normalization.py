"""Running per-device, per-channel normalisation shared by training and serving.

Both the offline trainer and the step operator call these two functions, so a model sees inputs scaled
exactly the same way in both.  The running mean and variance start as an exact cumulative average (weight
``1/(n+1)``) and turn into an exponential moving average once ``1/(n+1)`` falls below ``alpha``.
"""

from __future__ import annotations

import torch

#: Normalised values are clipped to this many standard deviations before they reach the cell or the loss,
#: so one wild reading cannot saturate a device's hidden state.
CLIP_Z = 8.0


def update_stats(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, x: torch.Tensor,
                 alpha: float, *, channels_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """New (mean, var) after seeing ``x``; ``count`` [B] is how many readings were seen before ``x``.

    ``mean``/``var``/``x`` are [B, C], or [C, B] (or [B]) with ``channels_first`` (the step operator's layout).

    >>> m, v = update_stats(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1), torch.tensor([[3.0]]), 0.1)
    >>> m.item(), v.item()
    (3.0, 0.0)
    """
    w = torch.clamp(1.0 / (count.to(mean.dtype) + 1.0), min=alpha)
    if not channels_first:
        w = w.unsqueeze(1)
    delta = x - mean
    return mean + w * delta, (1.0 - w) * (var + w * delta * delta)


def scale(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Standard deviation used for normalising, floored so a flat channel never divides by zero."""
    floor = (1e-3 * (mean.abs() + 1.0)) ** 2
    return torch.sqrt(var + floor)


def normalise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(x - mean) / scale, clipped to +-CLIP_Z."""
    return torch.clamp((x - mean) / scale(mean, var), -CLIP_Z, CLIP_Z)
