"""Online fine-tuning of the forecaster from the stream, behind guards against poisoning.

:class:`OnlineLearner` is the compute half of the trainer worker.  ``observe`` runs each batch through a shadow
:class:`~liquidstream.operators.operator.LiquidOperator` serving the current model, so every reading's score and alert
flag are exactly what the serving workers computed; the alert guard masks flagged readings; the readings are cut into
per-device windows (:mod:`liquidstream.operators.window_assembler`) that chain from the serving state, and the windows
go to a bounded replay buffer (:mod:`liquidstream.operators.online.replay_buffer`), a random share held out.  ``learn``
trains a candidate copy with :meth:`liquidstream.operators.training.Trainer.train_step` (the step offline training uses)
on batches capped per device, bounds its parameter drift, and accepts it only if it beats the serving model on the
held-out windows (median over devices).  ``adopt`` swaps a model in and keeps the previous one; ``check_rollback`` hands
the previous one back when the live error rises after a swap.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.errors import InputError
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.online import guards
from liquidstream.operators.online.config import OnlineSettings
from liquidstream.operators.online.replay_buffer import ReplayBuffer
from liquidstream.operators.operator import LiquidOperator
from liquidstream.operators.result import EventStatus, ObserveStats, UpdateDecision
from liquidstream.operators.training import MIN_HISTORY, State, Trainer, rollout_terms
from liquidstream.operators.window_assembler import STATE_FIELDS, FullWindows, WindowAssembler

#: Held-out windows evaluated per forward pass (bounds the evaluation's activation memory).
_EVAL_CHUNK = 4096


class OnlineLearner:
    """Learns from a stream of readings; see the module docstring.

    >>> model = Forecaster(n_channels=1, hidden_size=4, cell="liquid")
    >>> learner = OnlineLearner(model, OperatorSettings(), OnlineSettings(window=8, min_windows=4))
    >>> ts = 1_700_000_000_000 + np.arange(400) * 1000
    >>> vals = np.sin(np.arange(400) / 5.0).astype(np.float32)[:, None]
    >>> stats = learner.observe(["a", "b"] * 200, ts, vals)
    >>> stats.windows_completed, learner.learn().reason in {"accepted", "no_improvement", "buffer_too_small"}
    (50, True)
    """

    def __init__(self, model: Forecaster, operator_settings: OperatorSettings, settings: OnlineSettings,
                 *, device: str | torch.device = "cpu", model_version: str = "untrained") -> None:
        self.settings, self.operator_settings = settings, operator_settings
        self.device = torch.device(device)
        self.operator = LiquidOperator(model, operator_settings, device=self.device, model_version=model_version)
        self._model, self._version = self.operator.model, model_version
        s, hid, c = settings, model.hidden_size, model.n_channels
        self.assembler = WindowAssembler(window=s.window, n_channels=c, hidden_size=hid,
                                         max_devices=s.max_tracked_devices)
        self.buffer = ReplayBuffer(window=s.window, n_channels=c, hidden_size=hid, capacity=s.buffer_windows,
                                   max_per_device=s.max_windows_per_device if s.guard_device_cap else None,
                                   holdout_fraction=s.holdout_fraction, seed=s.seed)
        self.live = guards.LiveError(max_devices=s.max_tracked_devices)
        self._rng = np.random.default_rng(s.seed + 1)
        self._updates = 0
        self._last_good: tuple[dict[str, torch.Tensor], str] | None = None
        self._max_ts = -1
        self._evicted_at = -1
        self._round = {"completed": 0, "kept": 0, "dropped": 0}

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> Forecaster:
        return self._model

    @property
    def version(self) -> str:
        return self._version

    @property
    def buffer_windows(self) -> int:
        return len(self.buffer)

    @property
    def memory_bytes(self) -> int:
        """Host and device bytes of the buffer, the pending windows and the shadow operator's device state."""
        return self.buffer.nbytes() + self.assembler.nbytes() + self.operator.store.nbytes()

    # ------------------------------------------------------------------ observing the stream
    def observe(self, device_ids: Sequence[str], ts_ms: np.ndarray, values: np.ndarray) -> ObserveStats:
        """Score a batch as the serving workers do, and keep what may be learned from (see the module doc)."""
        ids = list(device_ids)
        new = self.assembler.untracked(ids)
        if new and len(self.assembler) < self.settings.max_tracked_devices:
            self.assembler.track(new, *self._serving_state(new))  # before process: the state at window start
        res = self.operator.process(ids, ts_ms, values)
        ts = np.asarray(ts_ms).astype(np.int64, copy=False)
        applied = (res.status == EventStatus.OK) | (res.status == EventStatus.FIRST)
        learn = guards.learnable(res, self.settings) & applied
        idx = np.flatnonzero(applied)
        self._round = {"completed": 0, "kept": 0, "dropped": 0}
        self.assembler.feed([ids[i] for i in idx.tolist()], ts[idx], np.asarray(values, np.float32)[idx],
                            learn[idx], self._complete, res.is_alert[idx])
        if idx.size:
            self._evict(int(ts[idx].max()))
        r = self._round
        return ObserveStats(len(ids), int(applied.sum()), int(learn.sum()), r["completed"], r["kept"],
                            r["dropped"], len(self.buffer))

    def _serving_state(self, device_ids: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """The shadow operator's state of these devices now (blank for devices it has not seen)."""
        store = self.operator.store
        rows = store.lookup(device_ids)
        state = self.assembler.blank_state(len(device_ids))
        last_ts = np.full(len(device_ids), -1, np.int64)
        in_alert = np.zeros(len(device_ids), bool)
        have = np.flatnonzero(rows >= 0)
        if have.size:
            r = rows[have]
            idx = torch.as_tensor(r, device=store.device)
            for name in ("h", "x_last", "mean", "var"):
                state[name][have] = store.tensors[name][idx].float().cpu().numpy()
            count = store.host["count"][r]
            state["count"][have] = count
            last_ts[have] = np.where(count > 0, store.host["last_ts_ms"][r], -1)
            in_alert[have] = store.tensors["alert_open"][idx].cpu().numpy()
        return state, last_ts, in_alert

    def _complete(self, full: FullWindows) -> dict[str, np.ndarray]:
        """Full windows: roll them through the serving model (live error, end states), buffer the good ones."""
        s = self.settings
        st: State = tuple(  # type: ignore[assignment]
            torch.from_numpy(full.state[n]).to(self.device) for n, _ in STATE_FIELDS)
        frozen = torch.from_numpy(full.frozen).to(self.device)
        with torch.no_grad():
            # Live error over every reading, flagged or not: a bad model flags everything, and must not
            # hide from the rollback guard behind its own alerts (the device median keeps attackers out).
            _, se, terms, end = rollout_terms(self._model, torch.from_numpy(full.values).to(self.device),
                                              torch.from_numpy(full.dt).to(self.device), torch.ones_like(frozen),
                                              st, self.operator_settings.stats_alpha, None, frozen)
        self.live.add(full.device_ids, se.cpu().numpy(), terms.cpu().numpy())
        # loss terms a window would give: learnable readings past the device's warm-up
        seen = full.state["count"][:, None] + np.arange(s.window)[None, :]
        keep = (full.learn & (seen >= MIN_HISTORY)).any(axis=1)
        if s.guard_alerts:
            keep &= (1.0 - full.learn.mean(axis=1)) <= s.max_masked_fraction
        k = np.flatnonzero(keep)
        if k.size:
            self.buffer.add([full.device_ids[i] for i in k.tolist()], full.values[k], full.dt[k], full.learn[k],
                            {n: v[k] for n, v in full.state.items()}, full.frozen[k])
        self._round["completed"] += len(full.device_ids)
        self._round["kept"] += int(k.size)
        self._round["dropped"] += len(full.device_ids) - int(k.size)
        return {n: t.float().cpu().numpy() for (n, _), t in zip(STATE_FIELDS, end, strict=True)}

    def _evict(self, now_ms: int) -> None:
        """Forget idle devices (event time) every tenth of the state TTL, in the shadow operator and here."""
        self._max_ts = max(self._max_ts, now_ms)
        ttl = self.operator_settings.state_ttl_s
        if self._evicted_at < 0:
            self._evicted_at = self._max_ts
        elif self._max_ts - self._evicted_at >= ttl * 100:  # ttl / 10, in ms
            self.operator.evict_idle(self._max_ts)
            self.assembler.evict_idle(self._max_ts, ttl)
            self._evicted_at = self._max_ts

    # ------------------------------------------------------------------ learning
    def _evaluate(self, model: Forecaster, slots: np.ndarray) -> dict[str, float]:
        """Device-median one-step NLL and MSE (normalised units) of ``model`` on buffered windows."""
        nll_l, se_l, terms_l, dev_l = [], [], [], []
        with torch.no_grad():
            for lo in range(0, len(slots), _EVAL_CHUNK):
                wb = self.buffer.gather(slots[lo:lo + _EVAL_CHUNK]).to(self.device)
                nll, se, terms, _ = rollout_terms(model, wb.values, wb.dt, wb.mask, wb.state,
                                                  self.operator_settings.stats_alpha, wb.learn, wb.frozen)
                nll_l.append(nll.cpu().numpy())
                se_l.append(se.cpu().numpy())
                terms_l.append(terms.cpu().numpy())
                dev_l.append(wb.devices)
        if not nll_l:
            return {"nll": math.nan, "mse": math.nan}
        terms_all, devs = np.concatenate(terms_l), np.concatenate(dev_l)
        return {"nll": guards.device_median(np.concatenate(nll_l), terms_all, devs),
                "mse": guards.device_median(np.concatenate(se_l), terms_all, devs)}

    def learn(self) -> UpdateDecision:
        """Train a candidate from the buffer with the shared training step, then apply the guards."""
        s = self.settings
        train, hold = self.buffer.slots(holdout=False), self.buffer.slots(holdout=True)
        figures: dict[str, float] = {"train_windows": float(len(train)), "holdout_windows": float(len(hold))}
        if len(train) < s.min_windows or (s.guard_validation and len(hold) == 0):
            return UpdateDecision(False, "buffer_too_small", None, figures)
        self._updates += 1
        candidate = copy.deepcopy(self._model)
        trainer = Trainer(candidate, lr=s.lr, window=s.window, batch_devices=s.batch_windows,
                          stats_alpha=self.operator_settings.stats_alpha, grad_clip=s.grad_clip, device=self.device,
                          seed=s.seed + self._updates, amp=s.amp)
        cap = max(1, int(s.max_device_share * s.batch_windows)) if s.guard_device_cap else None
        losses, samples, largest_share = [], 0, 0.0
        start = time.perf_counter()
        for _ in range(s.steps_per_update):
            slots = self.buffer.sample(s.batch_windows, self._rng, cap)
            wb = self.buffer.gather(slots).to(self.device)
            loss, _ = trainer.train_step(wb.values, wb.dt, wb.mask, wb.state, wb.learn, wb.frozen)
            losses.append(loss)
            samples += int(wb.mask.numel())
            largest_share = max(largest_share, float(np.bincount(wb.devices).max()) / len(wb))
        train_s = time.perf_counter() - start  # train_step syncs (loss.item()), so this is device time too
        serving_sd = {k: v.detach() for k, v in self._model.state_dict().items()}
        cand_sd = {k: v.detach() for k, v in candidate.state_dict().items()}
        drift = guards.relative_drift(cand_sd, serving_sd)
        figures |= {"steps": float(s.steps_per_update), "samples": float(samples), "train_s": train_s,
                    "samples_per_s": samples / max(train_s, 1e-9), "train_loss": float(np.mean(losses)),
                    "drift_raw": drift, "drift": drift, "largest_device_share": largest_share}
        if s.guard_drift and drift > s.max_drift:
            if s.drift_mode == "reject":
                return UpdateDecision(False, "drift_exceeded", None, figures)
            candidate.load_state_dict(guards.project(cand_sd, serving_sd, s.max_drift))
            figures["drift"] = guards.relative_drift(candidate.state_dict(), serving_sd)
        if len(hold):
            serving, cand = self._evaluate(self._model, hold), self._evaluate(candidate, hold)
            figures |= {"serving_val_nll": serving["nll"], "candidate_val_nll": cand["nll"],
                        "serving_val_mse": serving["mse"], "candidate_val_mse": cand["mse"]}
            if s.guard_validation and not guards.improved(serving[s.validation_metric], cand[s.validation_metric], s):
                return UpdateDecision(False, "no_improvement", None, figures)
        state = {k: v.detach().cpu().clone() for k, v in candidate.state_dict().items()}
        return UpdateDecision(True, "accepted", state, figures)

    # ------------------------------------------------------------------ swapping and rolling back
    def adopt(self, state_dict: dict[str, torch.Tensor], version: str) -> None:
        """Serve these weights from the next batch on; the model they replace becomes the last good one.

        Adopting the last good weights themselves (a rollback, under any version name) leaves no older model to
        roll back to.
        """
        model = copy.deepcopy(self._model)
        try:
            model.load_state_dict(state_dict)
        except (RuntimeError, KeyError) as ex:
            msg = f"weights of model version {version!r} do not fit the serving architecture: {ex}"
            raise InputError(msg) from ex
        previous = ({k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}, self._version)
        # A rollback may come back under a new version name (a new signed record): recognise the weights.
        rolled_back = self._last_good is not None and (self._last_good[1] == version or all(
            torch.equal(w, state_dict[k].detach().cpu()) for k, w in self._last_good[0].items() if k in state_dict))
        self._last_good = None if rolled_back else previous
        self.operator.swap_model(model, version)
        self._model, self._version = self.operator.model, version
        self.live.swap()

    def check_rollback(self) -> UpdateDecision | None:
        """The last good weights (reason ``rollback``) when the live error rose after the last swap, else None."""
        s = self.settings
        if not s.guard_rollback or self._last_good is None or self.live.events < s.rollback_min_events:
            return None
        before, after = self.live.baseline, self.live.current()
        if not (np.isfinite(before) and np.isfinite(after)) or after <= s.rollback_ratio * before:
            return None
        weights, version = self._last_good
        figures = {"live_mse_before": before, "live_mse_after": after, "live_events": float(self.live.events)}
        return UpdateDecision(True, "rollback", {k: v.clone() for k, v in weights.items()}, figures, version=version)
