"""How much is knowing the gap worth on a stream?  A reference forecaster that sees the times directly.

The study's cells must *learn* to use the gap through their recurrence.  :func:`window_reference` measures what the
readings themselves allow: a plain MLP (no recurrence, no continuous-time dynamics) given the last ``history`` readings
of the device, each with its exact age in seconds at the forecast time, predicts the next reading.  Its gap-blind twin
gets the same readings with every gap replaced by the nominal 1 s, exactly as the gap-blind cells are fed.  Both are
scored like the cells (:mod:`liquidstream.pipeline.eval.irregular.bins`): one-step squared error in the same running
per-device normalisation (:data:`~liquidstream.operators.training.MIN_HISTORY` readings of warm-up, statistics as of
before the reading), on the same held-out streams.

If even this reference gains little from the true times, the stream caps what any forecaster can get from the
gap; if it gains much more than the cells, the cells are what falls short.

>>> import numpy as np
>>> from liquidstream.operators.training import Sequences
>>> t = np.cumsum(np.random.default_rng(0).uniform(0.5, 3.0, 40))
>>> seqs = Sequences.from_columns(["a"] * 40, np.round(t * 1000).astype(np.int64),
...                               np.sin(t / 3.0).astype(np.float32)[:, None])
>>> out = window_reference(seqs, seqs, history=4, epochs=2)
>>> sorted(out), out["readings"]
(['blind_mse', 'gain_pct', 'mse', 'persistence_mse', 'readings'], 30)
"""

from __future__ import annotations

import torch
from torch import nn

from liquidstream.operators.normalization import normalise, update_stats
from liquidstream.operators.training import MIN_HISTORY, Sequences

__all__ = ["window_reference"]

#: Clip of every feature (normalised units, log-seconds): a reading far outside the running statistics would
#: otherwise dominate the MLP's first layer.
FEATURE_CLIP = 10.0
BATCH = 512  # samples per optimiser step


def _samples(seqs: Sequences, blind: bool, history: int, stats_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, F] and targets [N, C] (next reading minus the last, normalised) of every scored reading.

    Features: the last ``history`` readings relative to the last one, the last one itself, and each one's
    age at the forecast time as ``log1p(age)`` and ``age / 10`` (seconds; ages of 1 s steps when ``blind``).
    Devices with fewer readings so far see zeros (at age 0) in the missing places.
    """
    values, mask = seqs.values, seqs.mask
    dt = torch.where(mask & (seqs.dt > 0), torch.ones_like(seqs.dt), torch.zeros_like(seqs.dt)) if blind \
        else seqs.dt
    d, t_len, c = values.shape
    mean, var, count = torch.zeros(d, c), torch.ones(d, c), torch.zeros(d)
    past_v, past_t, clock = torch.zeros(d, history, c), torch.zeros(d, history), torch.zeros(d)  # clock: s
    feats: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    for i in range(t_len):
        x, m = values[:, i], mask[:, i]
        now = clock + dt[:, i]
        use = m & (count >= MIN_HISTORY)
        if bool(use.any()):
            z = normalise(past_v, mean.unsqueeze(1), var.unsqueeze(1))  # [D, L, C], statistics before x
            age = now.unsqueeze(1) - past_t  # [D, L] s
            f = torch.cat([(z - z[:, :1]).reshape(d, -1), z[:, 0], torch.log1p(age), age / 10.0], dim=1)
            feats.append(f[use].clamp(-FEATURE_CLIP, FEATURE_CLIP))
            targets.append((normalise(x, mean, var) - z[:, 0])[use])
        new_mean, new_var = update_stats(mean, var, count, x, stats_alpha)
        keep = m.unsqueeze(1)
        mean, var = torch.where(keep, new_mean, mean), torch.where(keep, new_var, var)
        past_v = torch.where(keep.unsqueeze(2), torch.cat([x.unsqueeze(1), past_v[:, :-1]], dim=1), past_v)
        past_t = torch.where(keep, torch.cat([now.unsqueeze(1), past_t[:, :-1]], dim=1), past_t)
        clock = torch.where(m, now, clock)
        count = count + m.to(count.dtype)
    if not feats:
        return torch.zeros(0, history * (c + 2) + c), torch.zeros(0, c)
    return torch.cat(feats), torch.cat(targets)


def _fit_mse(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, epochs: int,
             seed: int) -> float:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x_tr.shape[1], 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                        nn.Linear(128, y_tr.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr))
        for start in range(0, len(x_tr), BATCH):
            idx = perm[start:start + BATCH]
            loss = ((net(x_tr[idx]) - y_tr[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(((net(x_te) - y_te) ** 2).mean())


def window_reference(train: Sequences, test: Sequences, *, history: int = 8, epochs: int = 30, seed: int = 0,
                     stats_alpha: float = 0.005) -> dict[str, float]:
    """One-step MSE on ``test`` of the reference given the true times (``mse``) and of its gap-blind twin
    (``blind_mse``), ``gain_pct`` = 100 (blind - aware) / blind, ``persistence_mse`` and the scored
    ``readings``.  ``stats_alpha`` is the trainer's (:class:`~liquidstream.operators.training.Trainer`)."""
    out: dict[str, float] = {}
    for blind in (False, True):
        x_tr, y_tr = _samples(train, blind, history, stats_alpha)
        x_te, y_te = _samples(test, blind, history, stats_alpha)
        out["blind_mse" if blind else "mse"] = _fit_mse(x_tr, y_tr, x_te, y_te, epochs, seed)
        out["persistence_mse"], out["readings"] = float((y_te ** 2).mean()), len(y_te)
    out["gain_pct"] = 100.0 * (out["blind_mse"] - out["mse"]) / out["blind_mse"]
    return out
