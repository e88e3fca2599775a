"""Per-device state in contiguous tensors: one row per device, grown by a factor of 1.125.

Why columnar: the step operator gathers the rows of every device in a wave with one index operation and
scatters the new states back with another, so a wave of 10,000 devices costs one cell call, not 10,000.
The fields and their meaning are in :mod:`liquidstream.operators.state.fields`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from liquidstream.operators.state.codec import decode_snapshot, encode_snapshot
from liquidstream.operators.state.device_index import DeviceIndex
from liquidstream.operators.state.fields import GROWTH, HOST_FIELDS, NEUTRAL, TORCH_FIELDS, return_freed_memory

#: On the CPU, blocks at least this many columns wide are scattered by numpy's row assignment: half the time
#: of ``index_copy_`` for the float32 block (100 columns, 10,000 rows); narrower blocks are faster in torch.
_NUMPY_SCATTER_WIDTH = 32


class DeviceStateStore:
    """Hidden states and statistics of every known device.

    Fields of one dtype share one 2-D *block* (``blocks[dtype]``, shape ``[capacity, width]``); each entry
    of ``tensors`` is a column view of its block, so a wave gathers or scatters all of a device's float32
    fields with one index operation (one kernel on CUDA) instead of one per field.

    >>> store = DeviceStateStore(hidden_size=4, n_channels=2, initial_capacity=2)
    >>> rows, new = store.rows_for(["a", "b", "c", "a"])
    >>> rows.tolist(), new.tolist()
    ([0, 1, 2, 0], [True, True, True, True])
    >>> store.capacity, len(store)
    (3, 3)
    >>> blob = store.snapshot(["b"])
    >>> other = DeviceStateStore(hidden_size=4, n_channels=2)
    >>> other.restore(blob)
    ['b']
    """

    def __init__(self, hidden_size: int, n_channels: int, *, initial_capacity: int = 1024,
                 device: str | torch.device = "cpu",
                 extra_fields: Sequence[tuple[str, torch.dtype, str]] = ()) -> None:
        self.hidden_size = int(hidden_size)
        self.n_channels = int(n_channels)
        self.initial_capacity = max(1, int(initial_capacity))
        self.device = torch.device(device)
        self._index = DeviceIndex(self.initial_capacity)
        self._free: list[int] = []
        self.blocks: dict[torch.dtype, torch.Tensor] = {}
        self.columns: dict[str, tuple[int, int]] = {}  # field -> (start, stop) column in its dtype's block
        widths: dict[torch.dtype, int] = {}
        # Fields an operator option needs (the level likelihood's, with level_rule) join the blocks, the snapshots
        # and their layout check; zero-initialised.  Without options the layout is exactly TORCH_FIELDS.
        self._fields = TORCH_FIELDS + tuple(extra_fields)
        self._kind = {name: (dtype, kind) for name, dtype, kind in self._fields}
        for name, dtype, kind in self._fields:
            start = widths.get(dtype, 0)
            widths[dtype] = start + self._width(kind)
            self.columns[name] = (start, widths[dtype])
        self._widths = widths
        self.tensors: dict[str, torch.Tensor] = {}
        self.host: dict[str, np.ndarray] = {}
        self._allocate(self.initial_capacity)
        self._free.extend(range(self.capacity - 1, -1, -1))  # pop() hands out row 0 first

    # ------------------------------------------------------------------ layout
    def _width(self, kind: str) -> int:
        return {"H": self.hidden_size, "C": self.n_channels, "": 1}[kind]

    def _views(self) -> None:
        """Point ``tensors`` at the column ranges of the current blocks (after every reallocation)."""
        for name, dtype, kind in self._fields:
            start, stop = self.columns[name]
            col = self.blocks[dtype][:, start:stop]
            self.tensors[name] = col if kind else col[:, 0]

    def _allocate(self, capacity: int) -> None:
        old = self.capacity if self.blocks else 0
        for dtype, width in self._widths.items():
            fresh = torch.zeros((capacity, width), dtype=dtype, device=self.device)
            if old:
                fresh[:old] = self.blocks[dtype]
            self.blocks[dtype] = fresh
        self._views()
        if old:
            self._index.grow(capacity)
        for hname, ndtype in HOST_FIELDS:
            hfresh = np.zeros(capacity, dtype=ndtype)
            if old:
                hfresh[:old] = self.host[hname]
            self.host[hname] = hfresh
        self._reset(np.arange(old, capacity, dtype=np.int64))
        if old:
            return_freed_memory()

    def _reset(self, rows: np.ndarray) -> None:
        """Put rows back to the state of a device never seen."""
        if rows.size == 0:
            return
        idx = torch.as_tensor(rows, device=self.device)
        for block in self.blocks.values():
            block.index_fill_(0, idx, 0)
        for name, value in NEUTRAL.items():
            if name in self.tensors:
                self.tensors[name][idx] = value
        for hname, _ in HOST_FIELDS:
            self.host[hname][rows] = 0

    @property
    def capacity(self) -> int:
        return int(self.host["count"].shape[0])

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._index

    def device_ids(self) -> list[str]:
        """Ids of every device in the store, by row."""
        return self._index.ids_of(self._index.live_rows())

    def index_nbytes(self) -> int:
        """Bytes of the device-id index arrays (see :mod:`liquidstream.operators.state.device_index`)."""
        return self._index.nbytes()

    def nbytes(self) -> int:
        """Bytes held by the per-device arrays (capacity rows, not only the used ones)."""
        return sum(b.element_size() * b.nelement() for b in self.blocks.values()) + sum(
            a.nbytes for a in self.host.values())

    def gather(self, idx: torch.Tensor) -> dict[torch.dtype, torch.Tensor]:
        """Copies of the rows ``idx`` of every block (one index operation per dtype)."""
        if self.device.type == "cpu":  # numpy's take: a quarter of index_select's time on the narrow blocks
            rows = idx.numpy()
            return {dtype: torch.from_numpy(np.take(block.numpy(), rows, axis=0))
                    for dtype, block in self.blocks.items()}
        return {dtype: block.index_select(0, idx) for dtype, block in self.blocks.items()}

    def field(self, rows: dict[torch.dtype, torch.Tensor], name: str) -> torch.Tensor:
        """Field ``name`` of gathered ``rows`` (a column view, shaped like ``tensors[name][idx]``)."""
        dtype, kind = self._kind[name]
        start, stop = self.columns[name]
        col = rows[dtype][:, start:stop]
        return col if kind else col[:, 0]

    def scatter(self, idx: torch.Tensor, rows: dict[torch.dtype, torch.Tensor]) -> None:
        """Write gathered (and updated) ``rows`` back at ``idx`` (distinct rows)."""
        cpu = self.device.type == "cpu"
        for dtype, block in self.blocks.items():
            if cpu and block.shape[1] >= _NUMPY_SCATTER_WIDTH:
                block.numpy()[idx.numpy()] = rows[dtype].numpy()
            else:
                block.index_copy_(0, idx, rows[dtype])

    # ------------------------------------------------------------------ rows
    def lookup(self, device_ids: Sequence[str]) -> np.ndarray:
        """Row of each device, or -1 for devices not in the store."""
        return self._index.lookup(device_ids)

    def rows_for(self, device_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the devices, creating rows for unknown ones; also says which have no applied reading yet."""
        rows = self.lookup(device_ids)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            absent = [device_ids[i] for i in missing.tolist()]
            fresh = list(dict.fromkeys(absent))  # distinct, first-seen order
            self._new_rows(fresh)
            rows[missing] = self.lookup(absent)
        new = self.host["count"][rows] == 0
        return rows, new

    def _new_rows(self, device_ids: list[str]) -> list[int]:
        """Rows for distinct devices not in the store (growing it once if needed)."""
        short = len(device_ids) - len(self._free)
        if short > 0:
            start = self.capacity
            self._allocate(max(start + short, int(start * GROWTH) + 1))
            self._free[:0] = range(self.capacity - 1, start - 1, -1)  # below the free rows: used last
        rows = [self._free.pop() for _ in device_ids]
        self._index.insert(device_ids, np.array(rows, np.int64))
        return rows

    def drop(self, device_ids: Iterable[str]) -> list[str]:
        """Forget devices (e.g. their partition was revoked); returns those that were present."""
        ids = list(dict.fromkeys(device_ids))
        rows = self._index.lookup(ids)
        rows = rows[rows >= 0]
        dropped = self._index.remove(ids)
        self._reset(rows)
        self._free.extend(sorted(rows.tolist(), reverse=True))
        return dropped

    def evict_idle(self, now_ms: int, ttl_s: float) -> list[str]:
        """Drop devices whose last event is older than ``ttl_s`` seconds before ``now_ms`` (event time)."""
        live = self._index.live_rows()
        idle = live[self.host["last_ts_ms"][live] < now_ms - int(ttl_s * 1000)]
        return self.drop(self._index.ids_of(idle))

    # ------------------------------------------------------------------ snapshot / restore
    def snapshot(self, device_ids: Sequence[str] | None = None) -> bytes:
        """Serialise the named devices (all when None) to bytes; unknown ids are skipped."""
        if device_ids is None:
            rows = self._index.live_rows()
            ids = self._index.ids_of(rows)
        else:
            found = self.lookup(device_ids)
            ids = [d for d, r in zip(device_ids, found.tolist(), strict=True) if r >= 0]
            rows = found[found >= 0]
        # One gather per dtype block, then column slices: indexing each field's strided view is 10x slower.
        gathered = {dtype: block.cpu().numpy() for dtype, block in
                    self.gather(torch.as_tensor(rows, device=self.device)).items()}
        arrays = {}
        for name, dtype, kind in self._fields:
            start, stop = self.columns[name]
            col = gathered[dtype][:, start:stop]
            arrays[name] = col if kind else col[:, 0]
        arrays.update({name: self.host[name][rows] for name, _ in HOST_FIELDS})
        return encode_snapshot(ids, arrays, hidden_size=self.hidden_size, n_channels=self.n_channels)

    def restore(self, blob: bytes) -> list[str]:
        """Insert or overwrite the devices held in a snapshot; returns their ids."""
        ids, arrays = decode_snapshot(blob, hidden_size=self.hidden_size, n_channels=self.n_channels,
                                      expected={n: (np.dtype(str(d).replace("torch.", "")), k)
                                                for n, d, k in self._fields}
                                      | {n: (np.dtype(t), "") for n, t in HOST_FIELDS})
        rows, _ = self.rows_for(ids)
        idx = torch.as_tensor(rows, device=self.device)
        for name, _, _ in self._fields:
            self.tensors[name][idx] = torch.as_tensor(arrays[name], device=self.device)
        for hname, _ in HOST_FIELDS:
            self.host[hname][rows] = arrays[hname]
        return ids
