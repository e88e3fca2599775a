"""The guards of online fine-tuning against a poisoned stream, as small pure functions and one tracker.

An attacker who controls a few devices can send readings crafted so that a model which keeps learning
"quickly adapts to misinterpret legitimate data".  Each guard removes one lever:

* :func:`learnable` — readings inside an alert or scoring high are not learned from (the detector's own
  verdict keeps incidents and crafted outliers out of the training data);
* :func:`device_median` — errors are aggregated per device first, then the median over devices, so a few
  devices (however many windows they send) cannot move a validation or live-error figure;
* :func:`relative_drift` / :func:`project` — one update moves the parameters by a bounded relative amount;
* :class:`LiveError` — the serving error per device before and after a swap, for rollback.

The per-device cap of a training batch lives in :meth:`liquidstream.operators.online.replay_buffer.ReplayBuffer.sample`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from liquidstream.operators.online.config import OnlineSettings
from liquidstream.operators.result import StepResult


def learnable(result: StepResult, settings: OnlineSettings) -> np.ndarray:
    """bool [N]: readings the alert guard lets teach (all of them when the guard is off).

    A first reading has no score (NaN) and is learnable; a reading inside an alert or scoring above
    ``max_score`` is not.
    """
    if not settings.guard_alerts:
        return np.ones(len(result), bool)
    high = np.nan_to_num(result.score, nan=0.0) > settings.max_score
    ok: np.ndarray = ~result.is_alert & ~high
    return ok


def device_median(err_sum: np.ndarray, terms: np.ndarray, devices: Sequence[object] | np.ndarray) -> float:
    """Median over devices of each device's mean error (sum of errors / sum of terms); NaN without terms.

    >>> device_median(np.array([1.0, 3.0, 100.0, 200.0]), np.array([1.0, 1.0, 1.0, 1.0]), ["a", "b", "x", "x"])
    3.0
    """
    dev = np.asarray(devices)
    if dev.size == 0:
        return float("nan")
    _, inv = np.unique(dev, return_inverse=True)
    e = np.bincount(inv, weights=np.asarray(err_sum, np.float64))
    n = np.bincount(inv, weights=np.asarray(terms, np.float64))
    ok = n > 0
    return float(np.median(e[ok] / n[ok])) if ok.any() else float("nan")


def relative_drift(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
    """||new - old|| / ||old|| over every floating-point tensor of two state dicts (L2, all tensors as one).

    >>> relative_drift({"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 5.0])}) == (10 ** 0.5) / 5
    True
    """
    num = den = 0.0
    for name, o in old.items():
        if o.is_floating_point():
            num += float(((new[name].float() - o.float()) ** 2).sum())
            den += float((o.float() ** 2).sum())
    return float(num ** 0.5) / max(float(den ** 0.5), 1e-12)


def project(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], max_drift: float) -> dict[str, torch.Tensor]:
    """``new`` moved back towards ``old`` along the update so that its relative drift is ``max_drift``."""
    drift = relative_drift(new, old)
    if drift <= max_drift:
        return new
    f = max_drift / drift
    return {k: (o + f * (new[k] - o)) if o.is_floating_point() else new[k] for k, o in old.items()}


def improved(serving: float, candidate: float, settings: OnlineSettings) -> bool:
    """The validation guard's test: MSE by a relative margin, NLL by an absolute one (nats per reading)."""
    if not np.isfinite(candidate):
        return False
    if not np.isfinite(serving):
        return True
    if settings.validation_metric == "mse":
        return candidate <= serving * (1.0 - settings.min_improvement)
    return candidate <= serving - settings.min_improvement


class LiveError:
    """Per-device squared error of the serving model on the live stream, before and after the last swap.

    >>> live = LiveError(max_devices=10)
    >>> live.add(["a", "b"], np.array([2.0, 4.0]), np.array([2.0, 2.0]))
    >>> live.swap()
    >>> live.add(["a", "b"], np.array([6.0, 9.0]), np.array([2.0, 3.0]))
    >>> live.baseline, live.current(), live.events
    (1.5, 3.0, 5)
    """

    def __init__(self, max_devices: int) -> None:
        self.max_devices = max_devices
        self._acc: dict[str, list[float]] = {}  # device -> [sum of squared errors, terms] since the swap
        self.baseline = float("nan")  # device-median MSE of the period before the last swap
        self.events = 0  # learnable readings scored since the last swap

    def add(self, device_ids: Sequence[str], se_sum: np.ndarray, terms: np.ndarray) -> None:
        for dev, se, n in zip(device_ids, se_sum.tolist(), terms.tolist(), strict=True):
            if n <= 0:
                continue
            acc = self._acc.get(dev)
            if acc is None:
                if len(self._acc) >= self.max_devices:  # bounded: later devices wait for the next period
                    continue
                acc = self._acc[dev] = [0.0, 0.0]
            acc[0] += se
            acc[1] += n
            self.events += int(n)

    def current(self) -> float:
        """Device-median MSE since the last swap (NaN before any)."""
        if not self._acc:
            return float("nan")
        vals = np.array(list(self._acc.values()), np.float64)
        return device_median(vals[:, 0], vals[:, 1], np.arange(len(vals)))

    def swap(self) -> None:
        """A new model serves from now: the current period becomes the baseline (kept if it was empty)."""
        cur = self.current()
        if np.isfinite(cur):
            self.baseline = cur
        self._acc.clear()
        self.events = 0
