"""A synthetic poisoning attack on online fine-tuning, shared by the test and ``benchmarks/poisoning.py``.

A clean fleet (sinusoids of per-device period, phase and level, with noise, sampled at irregular gaps of
0.5-1.5 s) trains a small forecaster offline.  Then the fleet streams into an :class:`OnlineLearner`,
joined by a few attacker devices that send ``attack_rate`` times as many readings, crafted to drag the
model: by default every attacker reading is independent of the one before (white noise; its scale does not
matter, each device is normalised by its own statistics), which teaches "forget the last reading, forecast
the device's mean" — the opposite of what a smooth clean signal needs, where the last reading and the
recent trajectory are the best guide.  Each round the learner observes one slice of the
stream, trains a candidate, adopts it when accepted and rolls back when told.  The figure of merit is the
clean devices' one-step forecast MSE (normalised units) on a fixed clean evaluation stream the learner
never sees, before and after the rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.online.config import OnlineSettings
from liquidstream.operators.online.learner import OnlineLearner
from liquidstream.operators.training import Sequences, Trainer

T0_MS = 1_767_225_600_000


@dataclass(frozen=True)
class Scenario:
    """Sizes of the attack (the defaults run in seconds on one CPU core)."""

    clean_devices: int = 50
    attackers: int = 5
    channels: int = 2
    hidden: int = 16
    cell: str = "liquid"
    pretrain_readings: int = 256  # per clean device
    pretrain_epochs: int = 3
    rounds: int = 5
    readings_per_round: int = 32  # per clean device and round
    attack_rate: int = 4  # attacker readings per clean reading
    eval_readings: int = 160  # per clean device, after the stream
    #: ``noise`` (each reading independent of the last) or ``flip`` (two levels alternating every reading).
    attack: str = "noise"
    seed: int = 0

    def settings(self, *, guarded: bool, **kw: object) -> OnlineSettings:
        """The learner's settings for this scenario: small windows and batches, every guard on or off."""
        base: dict[str, object] = {"window": 16, "batch_windows": 64, "steps_per_update": 15, "min_windows": 32,
                                   "seed": self.seed} | kw
        return OnlineSettings(**base) if guarded else OnlineSettings.unguarded(**base)  # type: ignore[arg-type]


class _Fleet:
    """The clean devices' signals: continuous in time across pretraining, streaming and evaluation."""

    def __init__(self, sc: Scenario, rng: np.random.Generator) -> None:
        d, c = sc.clean_devices, sc.channels
        self.ids = [f"clean-{i}" for i in range(d)]
        self.period = rng.uniform(8.0, 30.0, size=(d, c))  # seconds
        self.phase = rng.uniform(0, 2 * np.pi, size=(d, c))
        self.level = rng.normal(0.0, 5.0, size=(d, c))
        self.amp = rng.uniform(0.5, 3.0, size=(d, c))
        self.noise = 0.05
        self.clock_ms = np.full(d, T0_MS, np.int64)
        self.rng = rng

    def take(self, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``n`` more readings per device, interleaved across devices in event-time order."""
        d, c = self.period.shape
        gaps = self.rng.integers(500, 1500, size=(d, n), endpoint=True)
        ts = self.clock_ms[:, None] + np.cumsum(gaps, axis=1)
        self.clock_ms = ts[:, -1].copy()
        t = (ts - T0_MS)[:, :, None] / 1000.0
        vals = self.level[:, None] + self.amp[:, None] * np.sin(2 * np.pi * t / self.period[:, None]
                                                                + self.phase[:, None])
        vals = vals + self.noise * self.amp[:, None] * self.rng.normal(size=vals.shape)
        order = np.argsort(ts.reshape(-1), kind="stable")
        dev = np.repeat(np.arange(d), n)[order]
        return [self.ids[i] for i in dev], ts.reshape(-1)[order], vals.reshape(-1, c)[order].astype(np.float32)


def _attack(sc: Scenario, rng: np.random.Generator, n: int, clock_ms: np.ndarray,
            ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``n`` crafted readings per attacker, at gaps like the clean fleet's (see :class:`Scenario.attack`)."""
    a, c = sc.attackers, sc.channels
    gaps = rng.integers(500, 1500, size=(a, n), endpoint=True)
    ts = clock_ms[:, None] + np.cumsum(gaps, axis=1)
    clock_ms[:] = ts[:, -1]
    if sc.attack == "flip":  # a two-level flip every reading: easy for the model to tell apart, so mild
        sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[None, :, None]
        vals = 3.0 * sign * np.ones((a, n, c)) + 0.05 * rng.normal(size=(a, n, c))
    else:  # "noise": every reading independent of the last
        vals = 3.0 * rng.normal(size=(a, n, c))
    order = np.argsort(ts.reshape(-1), kind="stable")
    dev = np.repeat(np.arange(a), n)[order]
    return [f"attacker-{i}" for i in dev], ts.reshape(-1)[order], vals.reshape(-1, c)[order].astype(np.float32)


@dataclass(frozen=True)
class Outcome:
    clean_before: float
    clean_after: float
    accepted: int
    rejected: int
    rollbacks: int


class PoisoningRun:
    """Pretrains once, then replays the same attacked stream into learners with different settings.

    >>> run = PoisoningRun(Scenario(clean_devices=6, attackers=1, pretrain_readings=40, pretrain_epochs=1,
    ...                             rounds=1, readings_per_round=16, eval_readings=30))
    >>> out = run.stream(OnlineSettings(window=8, min_windows=4, steps_per_update=2, batch_windows=8))
    >>> out.clean_before == run.clean_before and out.accepted + out.rejected == 1
    True
    """

    def __init__(self, sc: Scenario, operator_settings: OperatorSettings | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.sc, self.device = sc, torch.device(device)
        self.op_settings = operator_settings or OperatorSettings()
        rng = np.random.default_rng(sc.seed)
        fleet = _Fleet(sc, rng)
        torch.manual_seed(sc.seed)
        self.model = Forecaster(n_channels=sc.channels, hidden_size=sc.hidden, cell=sc.cell, head_units=32)
        pre = Sequences.from_columns(*fleet.take(sc.pretrain_readings))
        Trainer(self.model, window=32, lr=3e-3, stats_alpha=self.op_settings.stats_alpha, seed=sc.seed,
                device=self.device).fit(pre, sc.pretrain_epochs)
        # The stream: per round, a slice of the clean fleet and the attackers' crafted readings.
        attack_clock = np.full(sc.attackers, T0_MS + sc.pretrain_readings * 1000, np.int64)
        self.rounds: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        for _ in range(sc.rounds):
            ids, ts, vals = fleet.take(sc.readings_per_round)
            a_ids, a_ts, a_vals = _attack(sc, rng, sc.readings_per_round * sc.attack_rate, attack_clock)
            mix = rng.permutation(len(ids) + len(a_ids))  # arrival order interleaves devices at random
            self.rounds.append(([(ids + a_ids)[i] for i in mix], np.concatenate([ts, a_ts])[mix],
                                np.concatenate([vals, a_vals])[mix]))
        self.eval_seqs = Sequences.from_columns(*fleet.take(sc.eval_readings))
        self.clean_before = self.clean_error(self.model)

    def clean_error(self, model: Forecaster) -> float:
        """One-step forecast MSE (normalised units) of ``model`` on the clean evaluation stream."""
        trainer = Trainer(model, stats_alpha=self.op_settings.stats_alpha, device=self.device)
        return trainer.evaluate(self.eval_seqs)["mse"]

    def stream(self, settings: OnlineSettings) -> Outcome:
        """Run every round through a fresh learner (from the pretrained weights) with these settings."""
        learner = OnlineLearner(Forecaster(**self.model.config()), self.op_settings, settings,  # type: ignore[arg-type]
                                device=self.device, model_version="pretrained")
        learner.model.load_state_dict(self.model.state_dict())
        accepted = rejected = rollbacks = 0
        for k, (ids, ts, vals) in enumerate(self.rounds):
            learner.observe(ids, ts, vals)
            back = learner.check_rollback()
            if back is not None and back.state_dict is not None:
                learner.adopt(back.state_dict, back.version or "rollback")
                rollbacks += 1
            decision = learner.learn()
            if decision.accepted and decision.state_dict is not None:
                learner.adopt(decision.state_dict, f"online-{k}")
                accepted += 1
            else:
                rejected += 1
        return Outcome(self.clean_before, self.clean_error(learner.model), accepted, rejected, rollbacks)
