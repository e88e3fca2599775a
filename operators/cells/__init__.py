"""Continuous-time recurrent cells: :class:`LiquidCell`, :class:`LTCCell` and :class:`CfCCell`.

Contract shared by every cell (see :class:`~liquidstream.operators.cells.base.ContinuousCell`):

* ``cell(x, h, dt) -> h_new`` with ``x: [B, input_size]``, ``h: [B, hidden_size]`` and ``dt: [B]``
  floating seconds, **one step per row**; ``dt`` is cast to ``h``'s dtype and a negative ``dt`` is treated
  as ``0``.  Malformed shapes, non-float dtypes or mixed devices raise
  :class:`~liquidstream.operators.errors.InputError`.
* Row ``i`` of ``h_new`` depends only on row ``i`` of the inputs (batched call == one row at a time);
  inputs are never modified; the step is deterministic and has no Python loop over the batch.
* ``dt = 0`` leaves the state of the ODE cells (Liquid, LTC) bit-for-bit unchanged; any finite ``dt``
  (1e6 s included) gives a finite state.
* ``cell.time_constants(x, h) -> [B, hidden_size]``: each neuron's effective time constant, seconds, > 0.
* ``cell.config()`` returns ``{"kind": ..., **constructor kwargs}`` (JSON-serialisable), and
  ``build_cell(**cell.config())`` builds the same architecture (load the state dict to get the weights).

>>> import json
>>> cell = build_cell("ltc", input_size=2, hidden_size=4, ode_unfolds=3)
>>> type(cell).__name__, cell.config()["ode_unfolds"]
('LTCCell', 3)
>>> build_cell(**json.loads(json.dumps(cell.config()))).config() == cell.config()
True
>>> build_cell("gru", input_size=2, hidden_size=4)
Traceback (most recent call last):
...
liquidstream.operators.errors.ConfigError: unknown cell kind 'gru', expected one of ['cfc', 'liquid', 'ltc']
"""

from __future__ import annotations

import inspect
from typing import Any

from liquidstream.operators.cells.base import ContinuousCell
from liquidstream.operators.cells.cfc import CfCCell
from liquidstream.operators.cells.liquid import LiquidCell
from liquidstream.operators.cells.ltc import LTCCell
from liquidstream.operators.errors import ConfigError

__all__ = ["CfCCell", "ContinuousCell", "LTCCell", "LiquidCell", "build_cell"]

_KINDS: dict[str, type[ContinuousCell]] = {"cfc": CfCCell, "liquid": LiquidCell, "ltc": LTCCell}


def build_cell(kind: str, **config: Any) -> ContinuousCell:
    """Build a cell of ``kind`` (``"liquid"``, ``"ltc"``, ``"cfc"``) from its constructor kwargs.

    Accepts exactly what ``cell.config()`` returns.  An unknown kind, an unknown or missing key, or an
    out-of-range value raises :class:`~liquidstream.operators.errors.ConfigError`.
    """
    cls = _KINDS.get(kind)
    if cls is None:
        msg = f"unknown cell kind {kind!r}, expected one of {sorted(_KINDS)}"
        raise ConfigError(msg)
    params = inspect.signature(cls).parameters
    unknown = sorted(set(config) - set(params))
    if unknown:
        msg = f"unknown config keys for {kind!r} cell: {unknown}; accepted: {list(params)}"
        raise ConfigError(msg)
    missing = [name for name, p in params.items() if p.default is p.empty and name not in config]
    if missing:
        msg = f"missing config keys for {kind!r} cell: {missing}"
        raise ConfigError(msg)
    return cls(**config)
