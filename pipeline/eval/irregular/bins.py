"""One-step forecast error of the irregular-sampling study, overall and binned by the gap being forecast.

Whether knowing the gap helps depends on the gap: right after a reading (a burst) the next value is close
to the last one whatever the model knows, while after a dropout persistence is far off and only a model
that knows how much time passed can say where the signal went.  :func:`gap_metrics` therefore reports the
one-step MSE per bin of the **true** gap before the forecast reading (also for the gap-blind models, which
were fed ``dt = 1``), next to the overall MSE and Gaussian NLL.

Every term is exactly one of :meth:`liquidstream.operators.training.Trainer.evaluate`'s: the production
:func:`~liquidstream.operators.training.rollout_terms` runs one reading at a time over the held-out streams (same
running normalisation, same warm-up of ``MIN_HISTORY`` readings, normalised units), so the overall figures
equal ``Trainer.evaluate``'s.

>>> bin_labels((1.0, 4.0))
['< 1 s', '1-4 s', '>= 4 s']
"""

from __future__ import annotations

import numpy as np
import torch

from liquidstream.operators.training import Sequences, Trainer, initial_state, rollout_terms

#: Bin edges of the true gap, in seconds (CO2 and WaterFlow: nominal periods, since 1 week or 1 hour is
#: rescaled to 1 s).  < 0.5 s: the simulator's bursts; 0.5-1.5 s: one nominal period; 1.5-4 s and 4-10 s:
#: thinned readings (the recordings' sparse runs skip 2-8 readings); >= 10 s: dropouts.
GAP_EDGES_S: tuple[float, ...] = (0.5, 1.5, 4.0, 10.0)


def bin_labels(edges: tuple[float, ...] = GAP_EDGES_S) -> list[str]:
    """Human-readable labels of the ``len(edges) + 1`` gap bins."""
    e = [f"{x:g}" for x in edges]
    return [f"< {e[0]} s", *(f"{a}-{b} s" for a, b in zip(e[:-1], e[1:], strict=True)), f">= {e[-1]} s"]


@torch.no_grad()
def gap_metrics(trainer: Trainer, seqs: Sequences, true_dt: torch.Tensor,
                edges: tuple[float, ...] = GAP_EDGES_S) -> dict[str, object]:
    """Overall ``mse`` / ``nll`` and ``mse_by_gap`` / ``n_by_gap`` (label -> value) on ``seqs``.

    ``seqs`` are the readings as the model is fed them (gap-blind models: ``dt = 1``); ``true_dt`` [D, T]
    holds the real gaps in seconds, which choose the bin.  Bins without any scored reading are left out.
    """
    model, dev = trainer.model, trainer.device
    d, t = seqs.mask.shape
    vals, dts, mask = seqs.values.to(dev), seqs.dt.to(dev), seqs.mask.to(dev)
    state = initial_state(model, d, dev)
    se, nll, used = torch.zeros(d, t), torch.zeros(d, t), torch.zeros(d, t, dtype=torch.bool)
    for i in range(t):  # one reading per call: per-reading terms, the same recurrence as Trainer.evaluate
        n_i, se_i, k_i, state = rollout_terms(model, vals[:, i:i + 1], dts[:, i:i + 1], mask[:, i:i + 1], state,
                                              trainer.stats_alpha)
        se[:, i], nll[:, i], used[:, i] = se_i.cpu(), n_i.cpu(), k_i.cpu() > 0
    u = used.numpy()
    se_np, which = se.numpy()[u], np.digitize(true_dt.numpy()[u], edges)
    n_terms = max(int(u.sum()), 1)
    out_mse: dict[str, float] = {}
    out_n: dict[str, int] = {}
    for b, label in enumerate(bin_labels(edges)):
        sel = which == b
        if sel.any():  # empty bins are left out (WaterFlow has no gap under one period)
            out_n[label], out_mse[label] = int(sel.sum()), float(se_np[sel].mean())
    return {"mse": float(se_np.sum()) / n_terms, "nll": float(nll.numpy()[u].sum()) / n_terms,
            "mse_by_gap": out_mse, "n_by_gap": out_n}
