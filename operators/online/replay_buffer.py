"""Bounded replay buffer of per-device training windows for online fine-tuning.

A window is ``window`` consecutive readings of one device with their real gaps, which of them may teach
(``learn``), and the state the device was in just before the window (hidden state, last reading, running
normalisation, reading count), so a window trains from the state the serving operator had rather than from
zero.  Storage is preallocated numpy (host memory; a training batch is copied to the compute device), so
:meth:`ReplayBuffer.nbytes` is the whole footprint and never grows: at most ``capacity`` windows, the oldest
evicted first, and optionally at most ``max_per_device`` per device (the device's own oldest evicted first).
Each window is drawn into the held-out set with probability ``holdout_fraction`` when it arrives; held-out
windows are never trained on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from liquidstream.operators.errors import InputError
from liquidstream.operators.training import State
from liquidstream.operators.window_assembler import STATE_FIELDS as _STATE_FIELDS


@dataclass(frozen=True)
class WindowBatch:
    """Windows as tensors: B windows of T readings and C channels, ready for ``Trainer.train_step``."""

    values: torch.Tensor  # float32 [B, T, C], raw units
    dt: torch.Tensor  # float32 [B, T], seconds since the device's previous reading (0 for its first)
    mask: torch.Tensor  # bool [B, T], a reading is present (windows are full, so all True)
    learn: torch.Tensor  # bool [B, T], the reading may teach (not flagged by the alert guard)
    frozen: torch.Tensor  # bool [B, T], the operator froze the running statistics (inside an alert)
    state: State  # (h, x_last, mean, var, count) before the window's first reading
    devices: np.ndarray  # int64 [B], device code of each window (see ReplayBuffer.device_name)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def to(self, device: torch.device) -> WindowBatch:
        st: State = tuple(s.to(device, non_blocking=True) for s in self.state)  # type: ignore[assignment]
        return WindowBatch(self.values.to(device, non_blocking=True), self.dt.to(device, non_blocking=True),
                           self.mask.to(device, non_blocking=True), self.learn.to(device, non_blocking=True),
                           self.frozen.to(device, non_blocking=True), st, self.devices)


class ReplayBuffer:
    """At most ``capacity`` windows; at most ``max_per_device`` per device when that is set.

    >>> buf = ReplayBuffer(window=4, n_channels=1, hidden_size=2, capacity=3, max_per_device=2)
    >>> z = {"h": np.zeros((1, 2), np.float32), "x_last": np.zeros((1, 1), np.float32),
    ...      "mean": np.zeros((1, 1), np.float32), "var": np.ones((1, 1), np.float32),
    ...      "count": np.zeros(1, np.float32)}
    >>> v, d, l = np.zeros((1, 4, 1), np.float32), np.ones((1, 4), np.float32), np.ones((1, 4), bool)
    >>> for dev in ["a", "a", "a", "b", "c"]:
    ...     _ = buf.add([dev], v, d, l, z)
    >>> len(buf), sorted(buf.windows_per_device().items())
    (3, [('a', 1), ('b', 1), ('c', 1)])
    """

    def __init__(self, *, window: int, n_channels: int, hidden_size: int, capacity: int,
                 max_per_device: int | None = None, holdout_fraction: float = 0.0, seed: int = 0) -> None:
        self.window, self.n_channels, self.hidden_size = int(window), int(n_channels), int(hidden_size)
        self.capacity = int(capacity)
        self.max_per_device = max_per_device
        self.holdout_fraction = float(holdout_fraction)
        self._rng = np.random.default_rng(seed)
        cap, w, c = self.capacity, self.window, self.n_channels
        self.values = np.zeros((cap, w, c), np.float32)
        self.dt = np.zeros((cap, w), np.float32)
        self.learn = np.zeros((cap, w), bool)
        self.frozen = np.zeros((cap, w), bool)
        dims = {"H": (hidden_size,), "C": (c,), "": ()}
        self.state = {name: np.zeros((cap, *dims[kind]), np.float32) for name, kind in _STATE_FIELDS}
        self.device_code = np.full(cap, -1, np.int64)  # -1: free slot
        self.seq = np.zeros(cap, np.int64)  # arrival number: the smallest is the oldest
        self.holdout = np.zeros(cap, bool)
        self._next_seq = 0
        self._free = list(range(cap - 1, -1, -1))
        self._codes: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._free_codes: list[int] = []
        self._per_device: dict[int, deque[int]] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return self.capacity - len(self._free)

    def nbytes(self) -> int:
        """Bytes of the preallocated arrays (the buffer's whole footprint, whatever it holds)."""
        arrays = [self.values, self.dt, self.learn, self.frozen, self.device_code, self.seq, self.holdout,
                  *self.state.values()]
        return sum(a.nbytes for a in arrays)

    def device_name(self, code: int) -> str:
        return self._names[int(code)]

    def windows_per_device(self) -> dict[str, int]:
        return {self._names[code]: len(slots) for code, slots in self._per_device.items()}

    # ------------------------------------------------------------------ insertion and eviction
    def _code(self, device_id: str) -> int:
        code = self._codes.get(device_id)
        if code is None:
            code = self._free_codes.pop() if self._free_codes else len(self._codes)
            self._codes[device_id] = code
            self._names[code] = device_id
            self._per_device[code] = deque()
        return code

    def _release(self, slot: int) -> None:
        code = int(self.device_code[slot])
        slots = self._per_device[code]
        slots.remove(slot)
        if not slots:  # forget the device so device bookkeeping stays bounded by the capacity
            del self._per_device[code]
            del self._codes[self._names.pop(code)]
            self._free_codes.append(code)
        self.device_code[slot] = -1
        self.evicted += 1

    def _slot_for(self, device_id: str) -> int:
        code = self._codes.get(device_id)
        if code is not None and self.max_per_device is not None and len(self._per_device[code]) >= self.max_per_device:
            slot = self._per_device[code][0]  # the device's own oldest window makes room
            self._release(slot)
            return slot
        if self._free:
            return self._free.pop()
        slot = int(np.argmin(self.seq))  # full: every slot is used, the smallest arrival number is the oldest
        self._release(slot)
        return slot

    def add(self, device_ids: list[str], values: np.ndarray, dt: np.ndarray, learn: np.ndarray,
            state: dict[str, np.ndarray], frozen: np.ndarray | None = None) -> int:
        """Insert windows (row i belongs to ``device_ids[i]``); returns how many went to the held-out set."""
        n = len(device_ids)
        if values.shape != (n, self.window, self.n_channels) or dt.shape != (n, self.window) or \
                learn.shape != (n, self.window) or (frozen is not None and frozen.shape != (n, self.window)):
            msg = f"expected {n} windows of shape ({self.window}, {self.n_channels}), got {values.shape}"
            raise InputError(msg)
        held = self._rng.random(n) < self.holdout_fraction
        # More windows than the buffer holds: all but the newest ``capacity`` would be evicted at once.
        first = max(0, n - self.capacity)
        self.evicted += first
        for i in range(first, n):
            dev = device_ids[i]
            slot = self._slot_for(dev)  # may evict, even this device's last window, so the code comes after
            code = self._code(dev)
            self._per_device[code].append(slot)
            self.values[slot], self.dt[slot], self.learn[slot] = values[i], dt[i], learn[i]
            self.frozen[slot] = False if frozen is None else frozen[i]
            for name, arr in self.state.items():
                arr[slot] = state[name][i]
            self.device_code[slot], self.seq[slot], self.holdout[slot] = code, self._next_seq, held[i]
            self._next_seq += 1
        return int(held[first:].sum())

    # ------------------------------------------------------------------ reading
    def slots(self, *, holdout: bool) -> np.ndarray:
        """Used slots of the held-out (or the training) set, oldest first."""
        used = np.flatnonzero((self.device_code >= 0) & (self.holdout == holdout))
        return used[np.argsort(self.seq[used], kind="stable")]

    def sample(self, n: int, rng: np.random.Generator, per_device_cap: int | None = None) -> np.ndarray:
        """Up to ``n`` distinct training slots at random, at most ``per_device_cap`` from any one device."""
        perm = rng.permutation(self.slots(holdout=False))
        if per_device_cap is not None and perm.size:
            dev = self.device_code[perm]
            order = np.argsort(dev, kind="stable")  # keeps the random order within each device
            sdev = dev[order]
            starts = np.ones(len(order), bool)
            starts[1:] = sdev[1:] != sdev[:-1]
            pos = np.arange(len(order))
            rank = np.empty(len(order), np.int64)
            rank[order] = pos - np.maximum.accumulate(np.where(starts, pos, 0))
            perm = perm[rank < per_device_cap]
        return perm[:n]

    def gather(self, slots: np.ndarray) -> WindowBatch:
        """The windows in ``slots`` as CPU tensors."""
        st: State = tuple(torch.from_numpy(self.state[name][slots]) for name, _ in _STATE_FIELDS)  # type: ignore[assignment]
        learn = torch.from_numpy(self.learn[slots])
        return WindowBatch(torch.from_numpy(self.values[slots]), torch.from_numpy(self.dt[slots]),
                           torch.ones_like(learn), learn, torch.from_numpy(self.frozen[slots]), st,
                           self.device_code[slots].copy())
