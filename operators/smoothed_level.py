"""The smoothed level rule (``OperatorSettings.level_smoothing``): a level deviation read on a moving average.

The plain level rule compares each raw reading with the device's level (running mean) in units of the
reading's spread.  On a noisy channel a small persistent shift (a half-closed valve lowering a flow
reading by two standard deviations) then hides in the noise, while a channel that drifts slowly (a pump
warming up) crosses any threshold sooner or later.  The smoothed rule keeps an exponential moving average
``ema`` of every channel (weight ``a`` per reading) and scores ``z = (ema - mean) / s`` where ``s`` is the
spread this smoothed distance itself has on the device, learnt like the normalisation variance (and frozen
with it by ``reference_events``).  For white noise ``s`` is about ``sqrt(a / (2 - a))`` of the raw spread,
so a persistent shift reads several times larger; for a channel that wanders slowly ``s`` stays close to
its raw spread, so its wandering reads no larger than before.

State per device (two extra float32 per channel, allocated only when the option is on):
``level_ema`` (the moving average, raw units) and ``level_var`` (the spread of ``level_ema - mean``, raw
units squared).  Every function here is elementwise, so it works on ``[B, C]`` tensors and on the
operator's channels-first ``[C, B]`` ones alike: per-device masks and counts must broadcast against the
per-channel tensors (``[B]`` against ``[C, B]``, ``[B, 1]`` against ``[B, C]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liquidstream.operators.normalization import scale

#: Extra state-store fields of the smoothed level rule: (name, dtype, shape kind "C" = one per channel).
LEVEL_FIELDS: tuple[tuple[str, torch.dtype, str], ...] = (("level_ema", torch.float32, "C"),
                                                          ("level_var", torch.float32, "C"))


def level_fields(smoothing: float) -> tuple[tuple[str, torch.dtype, str], ...]:
    """The state-store fields the option needs: none when it is off, so the default state stays as small.

    >>> level_fields(0.0), [name for name, _, _ in level_fields(0.2)]
    ((), ['level_ema', 'level_var'])
    """
    return LEVEL_FIELDS if smoothing > 0 else ()


@dataclass
class SmoothedLevel:
    """The smoothed reading of one wave and its distance from the device's level."""

    ema: torch.Tensor  # the new moving average, raw units
    dev: torch.Tensor  # ema - level (0 at a device's first reading), raw units
    z: torch.Tensor  # dev in units of the device's spread of dev (signed)


def smoothed_level(x: torch.Tensor, ema: torch.Tensor, mean: torch.Tensor, level_var: torch.Tensor,
                   first: torch.Tensor, smoothing: float) -> SmoothedLevel:
    """Fold reading ``x`` into the moving average and measure it against the level ``mean``.

    ``first`` marks a device's first reading: its average starts at the reading and its distance is 0 (the
    level starts there too), so the learnt spread is not polluted by the zero-initialised state.

    >>> lv = smoothed_level(torch.tensor([[3.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]),
    ...                     torch.tensor([[0.25]]), torch.tensor([[False]]), 0.5)
    >>> lv.ema.item(), lv.dev.item(), round(lv.z.item(), 3)
    (2.0, 1.0, 2.0)
    """
    ema = torch.where(first, x, ema + smoothing * (x - ema))
    dev = (ema - mean).masked_fill(first, 0.0)
    return SmoothedLevel(ema, dev, dev / scale(mean, level_var))


def learn_spread(level_var: torch.Tensor, dev: torch.Tensor, count: torch.Tensor, alpha: float,
                 learn: torch.Tensor) -> torch.Tensor:
    """The spread of the smoothed distance after this reading, where ``learn`` allows it.

    Weighted like the normalisation statistics: an exact running mean of ``dev**2`` (weight ``1/(n+1)``)
    until that weight falls to ``alpha``, then an exponential one.

    >>> learn_spread(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]), torch.tensor([1, 1]), 0.01,
    ...              torch.tensor([True, False])).tolist()
    [5.0, 1.0]
    """
    w = torch.clamp(1.0 / (count.to(level_var.dtype) + 1.0), min=alpha)
    return torch.where(learn, level_var + w * (dev * dev - level_var), level_var)
