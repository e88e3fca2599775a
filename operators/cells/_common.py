"""Helpers shared by the cells: input validation and parameter initialisation.

The checks never synchronise a GPU: only metadata is inspected (no ``.item()``, no
``isfinite(...).all()``), so they cost a few attribute reads on the hot path.

>>> import torch
>>> x, h, dt = check_step(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), input_size=3, hidden_size=4)
>>> dt.shape
torch.Size([2])
>>> check_step(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 1), input_size=3, hidden_size=4)
Traceback (most recent call last):
...
liquidstream.operators.errors.InputError: dt must have shape [B] = [2] (one step per row, seconds), got [2, 1]
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch

from liquidstream.operators.errors import ConfigError, InputError


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def check_pair(
    x: torch.Tensor, h: torch.Tensor, *, input_size: int, hidden_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``x: [B, input_size]`` and ``h: [B, hidden_size]`` (same floating dtype and device)."""
    if not isinstance(x, torch.Tensor) or not isinstance(h, torch.Tensor):
        msg = f"x and h must be torch.Tensor, got {type(x).__name__} and {type(h).__name__}"
        raise InputError(msg)
    if x.dim() != 2 or x.shape[1] != input_size:
        msg = f"x must have shape [B, input_size] = [B, {input_size}], got {_shape(x)}"
        raise InputError(msg)
    if h.dim() != 2 or h.shape[1] != hidden_size:
        msg = f"h must have shape [B, hidden_size] = [B, {hidden_size}], got {_shape(h)}"
        raise InputError(msg)
    if x.shape[0] != h.shape[0]:
        msg = f"x and h must have the same batch size, got x {_shape(x)} and h {_shape(h)}"
        raise InputError(msg)
    if not x.is_floating_point() or not h.is_floating_point():
        msg = f"x and h must be floating point, got {x.dtype} and {h.dtype}"
        raise InputError(msg)
    if x.dtype != h.dtype:
        msg = f"x and h must share a dtype, got {x.dtype} and {h.dtype}"
        raise InputError(msg)
    if x.device != h.device:
        msg = f"x and h must be on the same device, got {x.device} and {h.device}"
        raise InputError(msg)
    return x, h


def check_step(
    x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor, *, input_size: int, hidden_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check one step's inputs; return ``dt`` cast to ``h``'s dtype and clamped to ``>= 0``.

    A negative ``dt`` is treated as ``0`` (the device clock never runs backwards).  Values are not
    inspected otherwise: a NaN ``dt`` propagates to that row's output.
    """
    check_pair(x, h, input_size=input_size, hidden_size=hidden_size)
    if not isinstance(dt, torch.Tensor):
        msg = f"dt must be a torch.Tensor of shape [B] seconds, got {type(dt).__name__}"
        raise InputError(msg)
    if dt.dim() != 1 or dt.shape[0] != h.shape[0]:
        msg = f"dt must have shape [B] = [{h.shape[0]}] (one step per row, seconds), got {_shape(dt)}"
        raise InputError(msg)
    if not dt.is_floating_point():
        msg = f"dt must be floating point seconds, got {dt.dtype}"
        raise InputError(msg)
    if dt.device != h.device:
        msg = f"dt must be on the same device as h ({h.device}), got {dt.device}"
        raise InputError(msg)
    return x, h, dt.to(h.dtype).clamp(min=0.0)


def check_sizes(input_size: int, hidden_size: int) -> None:
    """Raise :class:`ConfigError` unless both sizes are positive integers."""
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            msg = f"{name} must be a positive int, got {value!r}"
            raise ConfigError(msg)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """Raw value whose ``softplus`` is ``y`` (``y > 0``), for initialising constrained parameters.

    >>> import torch
    >>> y = torch.tensor([1e-3, 0.5, 30.0], dtype=torch.float64)
    >>> torch.allclose(torch.nn.functional.softplus(inverse_softplus(y)), y)
    True
    """
    return y + torch.log(-torch.expm1(-y))


class DerivedWeights:
    """Tensors derived from parameters (scaled, concatenated) for a serving path, rebuilt only on change.

    The key is every source parameter's in-place version counter and storage address, so an optimiser
    step, ``load_state_dict`` or a move to another device rebuilds them, and a steady serving loop pays no
    tensor op for them.  With autograd on, they are built fresh each call (so gradients flow).

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> cache = DerivedWeights()
    >>> with torch.no_grad():
    ...     first = cache.get([w], lambda: [w * 2])
    ...     _ = w.add_(1.0)
    ...     second = cache.get([w], lambda: [w * 2])
    >>> first[0].tolist(), second[0].tolist()
    ([2.0, 2.0], [4.0, 4.0])
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int], ...] | None = None
        self._value: list[torch.Tensor] = []

    def get(self, params: Sequence[torch.Tensor], build: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        if torch.is_grad_enabled():
            return build()
        key = tuple((p._version, p.data_ptr()) for p in params)
        if key != self._key:
            self._value, self._key = build(), key
        return self._value
