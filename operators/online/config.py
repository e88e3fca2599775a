"""Settings of online fine-tuning (the trainer worker) and of its guards against poisoned streams, one frozen value.

A pydantic model, so ``pipeline`` can nest it in its settings (env ``LIQUIDSTREAM_ONLINE__*``) and out-of-range
values are refused when the settings are built.  Every guard is on by default and can be turned off alone;
:meth:`OnlineSettings.unguarded` turns them all off (the comparison of the poisoning benchmark).  Units:
readings for window lengths, windows for buffer sizes, dimensionless ratios otherwise.

>>> s = OnlineSettings()
>>> s.guard_alerts, s.guard_validation, s.guard_drift, s.guard_device_cap, s.guard_rollback
(True, True, True, True, True)
>>> u = OnlineSettings.unguarded(window=16)
>>> u.window, u.guard_alerts, u.guard_rollback
(16, False, False)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

#: Names of the guard switches, in the order the issue lists them.
GUARDS = ("guard_alerts", "guard_validation", "guard_drift", "guard_device_cap", "guard_rollback")


class OnlineSettings(BaseModel, frozen=True):
    """Replay buffer, training and guard hyperparameters of
    :class:`~liquidstream.operators.online.learner.OnlineLearner`."""

    # --- replay buffer (bounded memory: at most buffer_windows x window readings, plus pending windows)
    #: Readings per training window, the truncated-BPTT length.
    window: int = Field(default=32, ge=2, le=4096)
    #: Windows held in the replay buffer; the oldest is evicted first.
    buffer_windows: int = Field(default=4096, ge=2)
    #: Windows one device may hold in the buffer (its own oldest is evicted first).  Enforced with
    #: ``guard_device_cap``: without it a fast device may fill the whole buffer.
    max_windows_per_device: int = Field(default=8, ge=1)
    #: Devices with a window being filled at once; readings of further devices are not learned from until
    #: one of these goes idle (``OperatorSettings.state_ttl_s``).  Bounds the pending memory.
    max_tracked_devices: int = Field(default=16384, ge=1)
    #: A completed window with more than this fraction of its readings masked by the alert guard is dropped:
    #: a window that is mostly incident teaches little and its few calm readings follow an anomaly.
    max_masked_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    # --- training
    #: Windows per optimiser step.
    batch_windows: int = Field(default=128, ge=1)
    #: Optimiser steps per candidate model.
    steps_per_update: int = Field(default=50, ge=1)
    #: Adam learning rate of the candidate's training.
    lr: float = Field(default=1e-3, gt=0.0)
    #: Gradients are clipped to this global norm.
    grad_clip: float = Field(default=1.0, gt=0.0)
    #: No candidate is trained before the buffer holds this many training windows.
    min_windows: int = Field(default=64, ge=1)
    #: Share of incoming windows held out for validation (chosen per window at random, never trained on).
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # --- guards
    #: Readings inside an alert, or scoring above ``max_score`` (the operator's score: -log10 of the reading's
    #: anomaly-likelihood tail probability; 4 = the default alert threshold), are not learned from.
    guard_alerts: bool = True
    max_score: float = Field(default=4.0, gt=0.0)
    #: A candidate is accepted only when its held-out error (median over devices of each device's mean) beats
    #: the serving model's: MSE by the relative margin ``min_improvement``, or NLL by ``min_improvement``
    #: nats per reading (an NLL can be negative, so a relative margin means nothing there).
    guard_validation: bool = True
    min_improvement: float = Field(default=0.01, ge=0.0)
    #: The held-out error compared: ``mse`` of the forecast mean, or ``nll`` of the Gaussian forecast.
    validation_metric: Literal["mse", "nll"] = "mse"
    #: Relative parameter change per update, ||theta_new - theta|| / ||theta||, is at most ``max_drift``:
    #: a larger change is scaled back onto that sphere (``project``) or refused (``reject``).
    guard_drift: bool = True
    max_drift: float = Field(default=0.05, gt=0.0)
    #: What ``guard_drift`` does with a larger change: ``project`` (scale back) or ``reject`` (refuse).
    drift_mode: Literal["project", "reject"] = "project"
    #: One device supplies at most ``max_device_share`` of the windows of a training batch.
    guard_device_cap: bool = True
    max_device_share: float = Field(default=0.05, gt=0.0, le=1.0)
    #: After a swap, once ``rollback_min_events`` learnable readings were forecast by the new model, its live
    #: error (median per-window MSE) above ``rollback_ratio`` x the error before the swap rolls back.
    guard_rollback: bool = True
    rollback_ratio: float = Field(default=1.5, gt=1.0)
    rollback_min_events: int = Field(default=2000, ge=1)
    # --- compute
    #: bf16 autocast of the training forward pass when the learner runs on CUDA (fp32 on the CPU).
    amp: bool = True
    #: Seed of the learner's random choices (hold-out split, batch sampling).
    seed: int = 0

    @classmethod
    def unguarded(cls, **kw: Any) -> OnlineSettings:
        """Settings with every guard off (keyword overrides apply to the other fields)."""
        return cls(**({g: False for g in GUARDS} | kw))
