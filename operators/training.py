"""Offline (and, later, online) training of a :class:`~liquidstream.operators.forecaster.Forecaster`.

Training runs the very recurrence the operator runs when serving (same normalisation, same
forecast-then-advance order, same per-device gaps), over many devices at once: step ``t`` of a batch is the
``t``-th reading of each device, exactly like the operator's waves.  Truncated backpropagation through time
carries the state across windows of ``window`` readings.  :meth:`Trainer.train_step` is the one training
step shared by the offline ``liquidstream train`` command and the online trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from liquidstream.operators.errors import InputError
from liquidstream.operators.forecaster import Forecaster, gaussian_nll
from liquidstream.operators.normalization import normalise, update_stats


@dataclass(frozen=True)
class Sequences:
    """Per-device reading sequences padded to one length: D devices, T steps, C channels."""

    device_ids: list[str]
    values: torch.Tensor  # float32 [D, T, C], raw units
    dt: torch.Tensor  # float32 [D, T], seconds since the device's previous reading (0 for its first)
    mask: torch.Tensor  # bool [D, T], False on padding

    @classmethod
    def from_columns(cls, device_ids: Sequence[str], ts_ms: np.ndarray, values: np.ndarray) -> Sequences:
        """Group readings by device and sort each device by event time (duplicates of a time are dropped).

        >>> s = Sequences.from_columns(["a", "b", "a"], np.array([2000, 0, 500]), np.ones((3, 1), np.float32))
        >>> s.device_ids, s.dt.tolist(), s.mask.tolist()
        (['a', 'b'], [[0.0, 1.5], [0.0, 0.0]], [[True, True], [True, False]])
        """
        ids = np.asarray(device_ids, dtype=object)
        if len(ids) == 0:
            msg = "no readings to build training sequences from"
            raise InputError(msg)
        uniq, inv = np.unique(ids, return_inverse=True)
        order = np.lexsort((ts_ms, inv))
        inv_s, ts_s, val_s = inv[order], np.asarray(ts_ms, np.int64)[order], np.asarray(values, np.float32)[order]
        keep = np.ones(len(order), bool)
        keep[1:] = ~((inv_s[1:] == inv_s[:-1]) & (ts_s[1:] == ts_s[:-1]))
        inv_s, ts_s, val_s = inv_s[keep], ts_s[keep], val_s[keep]
        starts = np.ones(len(inv_s), bool)
        starts[1:] = inv_s[1:] != inv_s[:-1]
        pos = np.arange(len(inv_s))
        step = pos - np.maximum.accumulate(np.where(starts, pos, 0))
        d, t = len(uniq), int(step.max()) + 1
        vals = np.zeros((d, t, val_s.shape[1]), np.float32)
        dts = np.zeros((d, t), np.float32)
        mask = np.zeros((d, t), bool)
        vals[inv_s, step] = val_s
        gaps = np.zeros(len(ts_s), np.float64)
        gaps[1:] = (ts_s[1:] - ts_s[:-1]) / 1000.0  # ms -> s
        dts[inv_s, step] = np.where(starts, 0.0, gaps)
        mask[inv_s, step] = True
        return cls([str(u) for u in uniq], torch.from_numpy(vals), torch.from_numpy(dts), torch.from_numpy(mask))

    def typical_gap_s(self) -> float:
        """Median gap between a device's consecutive readings, seconds (1.0 when there is none): the time unit
        a model trained on these sequences should use (:attr:`Forecaster.time_scale_s`).

        >>> Sequences.from_columns(["a"] * 4, np.array([0, 300_000, 600_000, 1_200_000]),
        ...                        np.zeros((4, 1), np.float32)).typical_gap_s()
        300.0
        """
        gaps = self.dt[self.mask & (self.dt > 0)]
        return float(gaps.median()) if gaps.numel() else 1.0


State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

#: Readings a device must have seen before its forecasts count in the loss.  Its running statistics are
#: meaningless before that (after two readings the variance is ~0), so those targets would be clipped noise
#: that dominates the gradient; the operator likewise raises no alert during warm-up.
MIN_HISTORY = 10
#: Early stopping as every offline training of the project runs it (demo, replay, train, evaluate): the last
#: fifth of each device's readings validates, 3 epochs of patience (:meth:`Trainer.fit`).
HOLDOUT = 0.2
PATIENCE = 3


def initial_state(model: Forecaster, batch: int, device: torch.device) -> State:
    """(h, x_last, mean, var, count) of devices that have seen nothing."""
    c = model.n_channels
    return (model.initial_state(batch, device), torch.zeros(batch, c, device=device),
            torch.zeros(batch, c, device=device), torch.ones(batch, c, device=device),
            torch.zeros(batch, device=device))


def rollout_terms(model: Forecaster, values: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor, state: State,
                  stats_alpha: float, learn: torch.Tensor | None = None, frozen: torch.Tensor | None = None,
                  beta: float = 0.0, absolute: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State]:
    """Per-row sums [B] of Gaussian NLL and squared error (normalised units) over a window, and term counts.

    ``mask`` [B, T] says which steps hold a reading (False on padding: the step is skipped entirely).
    ``learn`` [B, T] (default: ``mask``): readings that add a loss term; the others are still folded into
    the hidden state, as the operator serves them.  ``frozen`` [B, T] (default: none): readings that leave
    the running statistics unchanged, as the operator freezes them inside an alert (a device's first reading
    always initialises them).  ``beta`` > 0 weights each NLL term by its detached ``std ** (2 beta)``
    (beta-NLL, Seitzer et al. 2022: at ``beta = 1`` the mean's gradient is the squared error's).
    ``absolute`` (training): when the model has an absolute head, both sums also include that head's squared
    error (normalised units, mean over channels), so one loss trains the delta and the absolute forecasts
    jointly; off, the sums are the delta forecast's alone (what evaluation reports).

    >>> model = Forecaster(n_channels=1, hidden_size=4, cell="liquid")
    >>> v, d = torch.randn(2, 12, 1), torch.ones(2, 12)
    >>> m = torch.ones(2, 12, dtype=torch.bool)
    >>> nll, se, terms, _ = rollout_terms(model, v, d, m, initial_state(model, 2, torch.device("cpu")), 0.01)
    >>> terms.tolist()  # 12 readings each, the first MIN_HISTORY only warm the statistics up
    [2.0, 2.0]
    """
    h, x_last, mean, var, count = state
    learn = mask if learn is None else learn & mask
    nll_rows = values.new_zeros(values.shape[0])
    se_rows = values.new_zeros(values.shape[0])
    terms = values.new_zeros(values.shape[0])
    for t in range(values.shape[1]):
        x, d, m, lrn = values[:, t], dt[:, t], mask[:, t], learn[:, t]
        mu, sd, ab = model.forecast_all(h, normalise(x_last, mean, var), d)
        use = (lrn & (count >= MIN_HISTORY)).to(values.dtype)
        target = normalise(x, mean, var)
        # float32 sums even when autocast made the head run in bf16
        nll_el = gaussian_nll(target, mu.float(), sd.float())
        if beta:
            nll_el = nll_el * sd.float().detach() ** (2.0 * beta)
        nll_rows = nll_rows + nll_el.mean(1) * use
        se_rows = se_rows + ((target - mu.float()) ** 2).mean(1) * use
        if absolute and ab is not None:
            se_abs = ((target - ab.float()) ** 2).mean(1) * use
            nll_rows, se_rows = nll_rows + se_abs, se_rows + se_abs
        terms = terms + use
        with torch.no_grad():
            new_mean, new_var = update_stats(mean, var, count, x, stats_alpha)
            upd = m if frozen is None else m & (~frozen[:, t] | (count == 0))
            mean, var = torch.where(upd.unsqueeze(1), new_mean, mean), torch.where(upd.unsqueeze(1), new_var, var)
        keep = m.unsqueeze(1)
        h = torch.where(keep, model.advance(h, normalise(x, mean, var), d).to(h.dtype), h)
        x_last = torch.where(keep, x, x_last)
        count = count + m.to(count.dtype)
    return nll_rows, se_rows, terms, (h, x_last, mean, var, count)


def rollout_loss(model: Forecaster, values: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor, state: State,
                 stats_alpha: float, learn: torch.Tensor | None = None, frozen: torch.Tensor | None = None,
                 beta: float = 0.0, absolute: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State]:
    """Sum of Gaussian NLL (beta-weighted as in :func:`rollout_terms`) and squared error (normalised units)
    over a window, and the term count (``absolute``: as in :func:`rollout_terms`)."""
    nll, se, terms, new_state = rollout_terms(model, values, dt, mask, state, stats_alpha, learn, frozen, beta,
                                              absolute)
    return nll.sum(), se.sum(), terms.sum(), new_state


class Trainer:
    """Truncated-BPTT trainer over many devices at once.

    The loss is the Gaussian NLL of the one-step (delta) forecast plus, for a model with an absolute head,
    that head's squared error (normalised units): both forecasts train jointly.  Under the NLL the forecast
    mean learns slowly where the spread is wide (its gradient is divided by the variance), so two options
    speed the mean up: ``mean_warmup`` epochs of :meth:`fit` first train on squared error / 2 alone (the
    spread is untouched,
    the mean gets the gradient NLL gives it at unit spread), and ``beta`` > 0 trains on beta-NLL (see
    :func:`rollout_terms`).  Both default off (docs/evaluation.md, section 2, has the evidence); the online
    learner calls :meth:`train_step` directly, so ``mean_warmup`` never applies to it.  :meth:`evaluate`
    always reports the plain NLL.

    >>> seqs = Sequences.from_columns(["a"] * 5, np.arange(5) * 1000, np.random.rand(5, 2).astype(np.float32))
    >>> trainer = Trainer(Forecaster(n_channels=2, hidden_size=4, cell="liquid"), window=4)
    >>> losses = trainer.fit(seqs, epochs=2)
    >>> len(losses)
    2
    """

    def __init__(self, model: Forecaster, *, lr: float = 3e-3, window: int = 64, batch_devices: int = 256,
                 stats_alpha: float = 0.005, grad_clip: float = 1.0, device: str | torch.device = "cpu",
                 seed: int = 0, amp: bool = False, mean_warmup: int = 0, beta: float = 0.0) -> None:
        if mean_warmup < 0 or not 0.0 <= beta <= 1.0:
            msg = f"mean_warmup must be >= 0 epochs and beta in [0, 1], got {mean_warmup!r}, {beta!r}"
            raise InputError(msg)
        self.model = model.to(device)
        self.mean_warmup, self.beta = int(mean_warmup), float(beta)
        self.lr, self.window, self.batch_devices = lr, window, batch_devices
        self.stats_alpha, self.grad_clip = stats_alpha, grad_clip
        self.device = torch.device(device)
        #: bf16 autocast of the forward pass, on CUDA only (bf16 keeps fp32's exponent range, so no loss
        #: scaling is needed); the CPU always trains in fp32.
        self.amp = bool(amp) and self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        #: After an early-stopped :meth:`fit`: (epochs run, best epoch), 1-based, and each epoch's validation loss.
        self.stopped: tuple[int, int] | None = None
        self.validation: list[float] = []

    def train_step(self, values: torch.Tensor, dt: torch.Tensor, mask: torch.Tensor,
                   state: State, learn: torch.Tensor | None = None,
                   frozen: torch.Tensor | None = None, mean_only: bool = False) -> tuple[float, State]:
        """One optimiser step on one window; returns the mean loss and the detached carried state.

        The one training step of the project: ``liquidstream train`` (offline, via :meth:`fit`) and the
        online learner (:mod:`liquidstream.operators.online.learner`) both call it.  ``learn`` and ``frozen`` are as in
        :func:`rollout_terms`.  The loss is the (beta-)NLL, or squared error / 2 if ``mean_only``; either way
        including the absolute head's squared error (see ``absolute`` in :func:`rollout_terms`).
        """
        self.model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            nll, se, terms, new_state = rollout_loss(self.model, values, dt, mask, state, self.stats_alpha, learn,
                                                     frozen, self.beta, absolute=True)
        loss = (0.5 * se if mean_only else nll) / torch.clamp(terms, min=1.0)
        self.optimizer.zero_grad(set_to_none=True)
        if terms.item() > 0:
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        self.model.eval()
        # float32 again: under autocast the hidden state may come back in bf16
        detached: State = tuple(s.detach().float() for s in new_state)  # type: ignore[assignment]
        return float(loss.item()), detached

    def fit(self, seqs: Sequences, epochs: int, progress: Callable[[int, int, float], None] | None = None,
            *, holdout: float = 0.0, patience: int = PATIENCE) -> list[float]:
        """Train for at most ``epochs`` passes (the first ``mean_warmup`` of them on squared error);
        ``progress(done_steps, total_steps, last_loss)`` after each step.  Returns each epoch's mean loss.

        ``holdout`` > 0: early stopping.  The last ``holdout`` share of every device's readings is a
        validation part: the model never learns from it (those readings are still folded into the state, as
        serving would), and after each epoch the validation loss (the training loss on that part) is
        measured; training stops after ``patience`` epochs without improvement and the best epoch's weights
        are kept (:attr:`stopped` records the epochs run and the best one).  A liquid cell fitted on a short
        commissioning run overfits it; what generalises to the readings after it is what must be kept.
        """
        if not 0.0 <= holdout < 1.0 or patience < 1:
            msg = f"holdout must be in [0, 1) and patience >= 1, got {holdout!r}, {patience!r}"
            raise InputError(msg)
        d, t = seqs.mask.shape
        learn, val = seqs.mask, None
        self.validation, self.stopped = [], None
        if holdout > 0:
            steps = torch.arange(t).unsqueeze(0)
            cut = (seqs.mask.sum(dim=1, keepdim=True).float() * (1.0 - holdout)).floor()
            learn, val = seqs.mask & (steps < cut), seqs.mask & (steps >= cut)
        n_batches = -(-d // self.batch_devices)
        total = epochs * n_batches * (-(-t // self.window))
        done, history = 0, []
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        for epoch in range(epochs):
            perm = torch.randperm(d, generator=self.generator)
            epoch_losses = []
            for b in range(n_batches):
                sel = perm[b * self.batch_devices:(b + 1) * self.batch_devices]
                vals, dts, mask, lrn = (x[sel].to(self.device) for x in (seqs.values, seqs.dt, seqs.mask, learn))
                state = initial_state(self.model, len(sel), self.device)
                for start in range(0, t, self.window):
                    w = slice(start, start + self.window)
                    if val is not None and not bool(lrn[:, w].any()):
                        break  # only validation readings from here on (each device's part is its tail)
                    loss, state = self.train_step(vals[:, w], dts[:, w], mask[:, w], state, learn=lrn[:, w],
                                                  mean_only=epoch < self.mean_warmup)
                    epoch_losses.append(loss)
                    done += 1
                    if progress is not None:
                        progress(done, total, loss)
            history.append(float(np.mean(epoch_losses)))
            if val is not None:
                score = self.validation_loss(seqs, val)
                self.validation.append(score)
                if best is None or score < best[0]:
                    best = (score, epoch, {k: v.detach().clone() for k, v in self.model.state_dict().items()})
                elif epoch - best[1] >= patience:
                    break
        if best is not None:
            self.model.load_state_dict(best[2])
            self.stopped = (len(history), best[1] + 1)
        return history

    @torch.no_grad()
    def _rollout_all(self, seqs: Sequences, part: torch.Tensor | None, absolute: bool) -> tuple[float, float, float]:
        """Summed NLL and squared error over every device from a fresh state, and the term count (at least 1)."""
        nll, se, terms, _ = rollout_loss(self.model, seqs.values.to(self.device), seqs.dt.to(self.device),
                                         seqs.mask.to(self.device),
                                         initial_state(self.model, len(seqs.device_ids), self.device),
                                         self.stats_alpha, learn=None if part is None else part.to(self.device),
                                         absolute=absolute)
        return float(nll), float(se), max(float(terms), 1.0)

    def validation_loss(self, seqs: Sequences, part: torch.Tensor) -> float:
        """The training loss (NLL plus the absolute head's squared error) per reading of ``part`` [D, T]."""
        nll, _, n = self._rollout_all(seqs, part, absolute=True)
        return nll / n

    def evaluate(self, seqs: Sequences) -> dict[str, float]:
        """Mean one-step NLL and MSE (normalised units) over every reading after each device's warm-up."""
        nll, se, n = self._rollout_all(seqs, None, absolute=False)
        return {"nll": nll / n, "mse": se / n}
