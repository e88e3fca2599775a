"""Per-device state in contiguous tensors: one row per device, grown by doubling.

Why columnar: the step operator gathers the rows of every device in a wave with one index operation and
scatters the new states back with another, so a wave of 10,000 devices costs one cell call, not 10,000.
Fields (per device row):

==================  ===============  =====================================================================
field               dtype / shape    meaning
==================  ===============  =====================================================================
``h``               float32 [H]      hidden state of the cell
``x_last``          float32 [C]      last applied reading, raw units
``mean``, ``var``   float32 [C]      running per-channel normalisation of this device (raw units)
``score_mean/var``  float32          running statistics of the device's anomaly score
``gap_ema``         float32          smoothed gap between readings, seconds (the forecast horizon)
``z2_fast``         float32          short running mean of squared calibrated residuals (sustained deviation)
``calib``           float32 [C]      long running mean of squared standardised residuals per channel: the
                                     device's own calibration of the model's predicted variance
``alert_open``      bool             an alert is open on this device
``alert_since_ms``  int64            event time the open alert began, epoch ms
``cooldown_ms``     int64            no new alert before this event time, epoch ms
``calm``            int32            consecutive calm readings while an alert is open (hysteresis)
``stuck``           int16 [C]        consecutive exactly-repeated values per channel
``last_ts_ms``      int64 (host)     event time of the last applied reading, epoch ms
``count``           int32 (host)     readings applied so far
==================  ===============  =====================================================================

``last_ts_ms`` and ``count`` live in numpy on the host because the event-time policies run there; the
rest lives on the compute device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from operators.state_codec import decode_snapshot, encode_snapshot

_TORCH_FIELDS: tuple[tuple[str, torch.dtype, str], ...] = (
    # (name, dtype, shape kind: "H" hidden, "C" channels, "" scalar)
    ("h", torch.float32, "H"),
    ("x_last", torch.float32, "C"),
    ("mean", torch.float32, "C"),
    ("var", torch.float32, "C"),
    ("score_mean", torch.float32, ""),
    ("score_var", torch.float32, ""),
    ("gap_ema", torch.float32, ""),
    ("z2_fast", torch.float32, ""),
    ("calib", torch.float32, "C"),
    ("alert_open", torch.bool, ""),
    ("alert_since_ms", torch.int64, ""),
    ("cooldown_ms", torch.int64, ""),
    ("calm", torch.int32, ""),
    ("stuck", torch.int16, "C"),
)
#: Fields whose neutral value is 1 (variances and residual energies), so nothing divides by zero.
_ONE_FIELDS = frozenset({"var", "z2_fast", "calib"})
_HOST_FIELDS: tuple[tuple[str, type[np.generic]], ...] = (("last_ts_ms", np.int64), ("count", np.int32))


class DeviceStateStore:
    """Hidden states and statistics of every known device.

    >>> store = DeviceStateStore(hidden_size=4, n_channels=2, initial_capacity=2)
    >>> rows, new = store.rows_for(["a", "b", "c", "a"])
    >>> rows.tolist(), new.tolist()
    ([0, 1, 2, 0], [True, True, True, True])
    >>> store.capacity, len(store)
    (4, 3)
    >>> blob = store.snapshot(["b"])
    >>> other = DeviceStateStore(hidden_size=4, n_channels=2)
    >>> other.restore(blob)
    ['b']
    """

    def __init__(self, hidden_size: int, n_channels: int, *, initial_capacity: int = 1024,
                 device: str | torch.device = "cpu") -> None:
        self.hidden_size = int(hidden_size)
        self.n_channels = int(n_channels)
        self.initial_capacity = max(1, int(initial_capacity))
        self.device = torch.device(device)
        self._index: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.host: dict[str, np.ndarray] = {}
        self._allocate(self.initial_capacity)
        self._free.extend(range(self.capacity - 1, -1, -1))  # pop() hands out row 0 first

    # ------------------------------------------------------------------ layout
    def _shape(self, kind: str, rows: int) -> tuple[int, ...]:
        return {"H": (rows, self.hidden_size), "C": (rows, self.n_channels), "": (rows,)}[kind]

    def _allocate(self, capacity: int) -> None:
        old = self.capacity if self.tensors else 0
        for name, dtype, kind in _TORCH_FIELDS:
            fresh = torch.zeros(self._shape(kind, capacity), dtype=dtype, device=self.device)
            if old:
                fresh[:old] = self.tensors[name]
            self.tensors[name] = fresh
        for hname, ndtype in _HOST_FIELDS:
            hfresh = np.zeros(capacity, dtype=ndtype)
            if old:
                hfresh[:old] = self.host[hname]
            self.host[hname] = hfresh
        self._ids.extend([None] * (capacity - old))
        self._reset(np.arange(old, capacity, dtype=np.int64))

    def _reset(self, rows: np.ndarray) -> None:
        """Put rows back to the state of a device never seen."""
        if rows.size == 0:
            return
        idx = torch.as_tensor(rows, device=self.device)
        for name, _, _ in _TORCH_FIELDS:
            self.tensors[name][idx] = 1 if name in _ONE_FIELDS else 0
        for hname, _ in _HOST_FIELDS:
            self.host[hname][rows] = 0

    @property
    def capacity(self) -> int:
        return int(self.host["count"].shape[0])

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._index

    def device_ids(self) -> list[str]:
        return list(self._index)

    def nbytes(self) -> int:
        """Bytes held by the per-device arrays (capacity rows, not only the used ones)."""
        return sum(t.element_size() * t.nelement() for t in self.tensors.values()) + sum(
            a.nbytes for a in self.host.values())

    # ------------------------------------------------------------------ rows
    def lookup(self, device_ids: Sequence[str]) -> np.ndarray:
        """Row of each device, or -1 for devices not in the store."""
        get = self._index.get
        return np.fromiter((get(d, -1) for d in device_ids), dtype=np.int64, count=len(device_ids))

    def rows_for(self, device_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the devices, creating rows for unknown ones; also says which have no applied reading yet."""
        rows = self.lookup(device_ids)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            created: dict[str, int] = {}
            for i in missing.tolist():
                dev = device_ids[i]
                row = created.get(dev)
                if row is None:
                    row = self._new_row(dev)
                    created[dev] = row
                rows[i] = row
        new = self.host["count"][rows] == 0
        return rows, new

    def _new_row(self, device_id: str) -> int:
        if not self._free:
            start = self.capacity
            self._allocate(start * 2)
            self._free.extend(range(self.capacity - 1, start - 1, -1))
        row = self._free.pop()
        self._index[device_id] = row
        self._ids[row] = device_id
        return row

    def drop(self, device_ids: Iterable[str]) -> list[str]:
        """Forget devices (e.g. their partition was revoked); returns those that were present."""
        dropped = [d for d in device_ids if d in self._index]
        rows = np.array([self._index.pop(d) for d in dropped], dtype=np.int64)
        for r in rows.tolist():
            self._ids[r] = None
        self._reset(rows)
        self._free.extend(sorted(rows.tolist(), reverse=True))
        return dropped

    def evict_idle(self, now_ms: int, ttl_s: float) -> list[str]:
        """Drop devices whose last event is older than ``ttl_s`` seconds before ``now_ms`` (event time)."""
        used = np.array(sorted(self._index.values()), dtype=np.int64)
        if used.size == 0:
            return []
        idle = used[self.host["last_ts_ms"][used] < now_ms - int(ttl_s * 1000)]
        return self.drop([d for d in (self._ids[r] for r in idle.tolist()) if d is not None])

    # ------------------------------------------------------------------ snapshot / restore
    def snapshot(self, device_ids: Sequence[str] | None = None) -> bytes:
        """Serialise the named devices (all when None) to bytes; unknown ids are skipped."""
        ids = self.device_ids() if device_ids is None else [d for d in device_ids if d in self._index]
        rows = self.lookup(ids)
        idx = torch.as_tensor(rows, device=self.device)
        arrays = {name: self.tensors[name][idx].cpu().numpy() for name, _, _ in _TORCH_FIELDS}
        arrays.update({name: self.host[name][rows] for name, _ in _HOST_FIELDS})
        return encode_snapshot(ids, arrays, hidden_size=self.hidden_size, n_channels=self.n_channels)

    def restore(self, blob: bytes) -> list[str]:
        """Insert or overwrite the devices held in a snapshot; returns their ids."""
        ids, arrays = decode_snapshot(blob, hidden_size=self.hidden_size, n_channels=self.n_channels,
                                      expected={n: (np.dtype(str(d).replace("torch.", "")), k)
                                                for n, d, k in _TORCH_FIELDS}
                                      | {n: (np.dtype(t), "") for n, t in _HOST_FIELDS})
        rows, _ = self.rows_for(ids)
        idx = torch.as_tensor(rows, device=self.device)
        for name, _, _ in _TORCH_FIELDS:
            self.tensors[name][idx] = torch.as_tensor(arrays[name], device=self.device)
        for hname, _ in _HOST_FIELDS:
            self.host[hname][rows] = arrays[hname]
        return ids
