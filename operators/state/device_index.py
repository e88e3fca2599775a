"""Device id -> store row, held in numpy arrays instead of a Python dict of str.

A dict costs about 156 bytes per device at 100k devices (the id's str object, an int object per row, the
dict's slots): a third of the whole per-device budget.  This index keeps, per row, the id's 64-bit hash
(int64) and its UTF-8 bytes (numpy ``S<w>``, ``w`` = the longest id seen, at most :data:`MAX_WIDTH`), plus
an open-addressing table of int32 rows (linear probing, load <= 1/2): about 35 bytes per device for
14-character ids.  Every lookup is vectorised over the batch and checks the stored bytes, so two ids with
the same hash never share a row.  Ids longer than :data:`MAX_WIDTH` bytes go to a small dict, so one odd
long id cannot widen every row.

>>> index = DeviceIndex(capacity=4)
>>> index.insert(["a", "b"], np.array([0, 1]))
>>> index.lookup(["b", "z", "a"]).tolist(), len(index), "a" in index
([1, -1, 0], 2, True)
>>> index.remove(["a"]), index.lookup(["a"]).tolist(), index.ids_of(np.array([1]))
(['a'], [-1], ['b'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Ids up to this many UTF-8 bytes live in the arrays; longer ones in a dict.
MAX_WIDTH = 32
_EMPTY, _TOMB = -1, -2


def _utf8(device_ids: Sequence[str]) -> np.ndarray:
    """The ids as a numpy bytes array (UTF-8; lone surrogates kept as they are, never raising)."""
    try:
        return np.array(device_ids, dtype="S")  # ASCII fast path: one C loop
    except UnicodeEncodeError:
        return np.array([d.encode("utf-8", "surrogatepass") for d in device_ids], dtype="S")


class DeviceIndex:
    """Maps device ids to rows ``0 .. capacity-1``; the caller hands out rows and grows the capacity."""

    #: str -> int; Python's (per-process salted) hash.  Tests swap in a weak one to force collisions.
    hash_fn: Callable[[str], int] = hash

    def __init__(self, capacity: int) -> None:
        self._hash = np.zeros(capacity, np.int64)
        self._key = np.zeros(capacity, "S1")
        self._live = np.zeros(capacity, np.bool_)
        self._table = np.full(16, _EMPTY, np.int32)
        self._used = 0  # live entries in the table (long ids excluded)
        self._tombs = 0
        self._long: dict[str, int] = {}
        self._long_rows: dict[int, str] = {}

    def grow(self, capacity: int) -> None:
        old = self._hash.shape[0]
        for name in ("_hash", "_key", "_live"):
            arr = getattr(self, name)
            fresh = np.zeros(capacity, arr.dtype)
            fresh[:old] = arr
            setattr(self, name, fresh)

    def __len__(self) -> int:
        return self._used + len(self._long)

    def __contains__(self, device_id: object) -> bool:
        return isinstance(device_id, str) and self._lookup_one(device_id) >= 0

    def nbytes(self) -> int:
        """Bytes of the index arrays (the long-id dict, normally empty, is not counted)."""
        return int(self._hash.nbytes + self._key.nbytes + self._live.nbytes + self._table.nbytes)

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self._live)

    # ------------------------------------------------------------------ lookups
    def _split(self, device_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hashes, UTF-8 keys, and positions of the long ids of a batch."""
        n = len(device_ids)
        hv = np.fromiter(map(self.hash_fn, device_ids), np.int64, n)
        keys = _utf8(device_ids)
        if keys.dtype.itemsize <= MAX_WIDTH:
            return hv, keys, np.zeros(0, np.int64)
        return hv, keys, np.flatnonzero(np.char.str_len(keys) > MAX_WIDTH)

    def _probe(self, hv: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, table slot) of each (hash, key), -1 where absent; linear probing, vectorised per step."""
        n = hv.shape[0]
        rows = np.full(n, -1, np.int64)
        slots = np.full(n, -1, np.int64)
        mask = self._table.shape[0] - 1
        pending = np.arange(n)
        pos = hv & mask
        while pending.size:
            found = self._table[pos].astype(np.int64)
            hit = found >= 0
            ok = hit.copy()
            r = found[hit]
            ok[hit] = (self._hash[r] == hv[pending[hit]]) & (self._key[r] == keys[pending[hit]])
            rows[pending[ok]], slots[pending[ok]] = found[ok], pos[ok]
            more = ~ok & (found != _EMPTY)  # a tombstone or another key: the probe goes on
            pending, pos = pending[more], (pos[more] + 1) & mask
        return rows, slots

    def _lookup_one(self, device_id: str) -> int:
        """One id without numpy's per-call overhead (``in``, single-device snapshots)."""
        if device_id in self._long:
            return self._long[device_id]
        try:
            key = device_id.encode("utf-8", "surrogatepass")
        except UnicodeEncodeError:
            return -1
        if len(key) > MAX_WIDTH:
            return -1
        hv = self.hash_fn(device_id)
        table, mask = self._table, self._table.shape[0] - 1
        pos = hv & mask
        while (row := int(table[pos])) != _EMPTY:
            if row >= 0 and int(self._hash[row]) == hv and self._key[row] == key.rstrip(b"\0"):
                return row
            pos = (pos + 1) & mask
        return -1

    def lookup(self, device_ids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 where unknown (int64 [N])."""
        if len(device_ids) == 0:
            return np.zeros(0, np.int64)
        if len(device_ids) == 1:
            return np.array([self._lookup_one(device_ids[0])], np.int64)
        hv, keys, long_pos = self._split(device_ids)
        if long_pos.size == 0:
            return self._probe(hv, keys)[0]
        rows = np.full(len(device_ids), -1, np.int64)
        short = np.ones(len(device_ids), np.bool_)
        short[long_pos] = False
        rows[short] = self._probe(hv[short], keys[short])[0]
        get = self._long.get
        rows[long_pos] = [get(device_ids[i], -1) for i in long_pos.tolist()]
        return rows

    def ids_of(self, rows: np.ndarray) -> list[str]:
        """Device ids of live ``rows``."""
        keys: list[bytes] = self._key[rows].tolist()
        out = [k.decode("utf-8", "surrogatepass") for k in keys]
        if self._long_rows:
            for j, r in enumerate(rows.tolist()):
                if r in self._long_rows:
                    out[j] = self._long_rows[r]
        return out

    # ------------------------------------------------------------------ changes
    def insert(self, device_ids: Sequence[str], rows: np.ndarray) -> None:
        """Add distinct ids not in the index at ``rows`` (free rows below the capacity)."""
        if len(device_ids) == 0:
            return
        hv, keys, long_pos = self._split(device_ids)
        rows = np.asarray(rows, np.int64)
        short = np.ones(len(device_ids), np.bool_)
        if long_pos.size:
            short[long_pos] = False
            for i in long_pos.tolist():
                self._long[device_ids[i]] = int(rows[i])
                self._long_rows[int(rows[i])] = device_ids[i]
        self._live[rows] = True
        hv, keys, rows = hv[short], keys[short], rows[short]
        if keys.size and keys.dtype.itemsize > self._key.dtype.itemsize:
            self._key = self._key.astype(keys.dtype)  # widen to the longest id so far (<= MAX_WIDTH)
        self._hash[rows], self._key[rows] = hv, keys
        self._used += rows.size
        if 2 * (self._used + self._tombs) > self._table.shape[0]:
            self._rebuild(self._used)  # places every live row, the new ones included
        else:
            self._place(hv, rows)

    def _place(self, hv: np.ndarray, rows: np.ndarray) -> None:
        """Put rows into free slots, vectorised: per probe step, the first claimant of a free slot wins."""
        mask = self._table.shape[0] - 1
        pending = np.arange(rows.shape[0])
        pos = hv & mask
        while pending.size:
            free = np.flatnonzero(self._table[pos] < 0)
            slots, first = np.unique(pos[free], return_index=True)
            won = free[first]
            self._tombs -= int((self._table[slots] == _TOMB).sum())
            self._table[slots] = rows[pending[won]]
            lost = np.ones(pending.shape[0], np.bool_)
            lost[won] = False
            pending, pos = pending[lost], (pos[lost] + 1) & mask

    def _rebuild(self, live: int) -> None:
        size = 16
        while size < 2 * live:
            size *= 2
        self._table = np.full(max(size, 16), _EMPTY, np.int32)
        self._tombs = 0
        rows = np.flatnonzero(self._live)
        rows = rows[~np.isin(rows, np.fromiter(self._long_rows, np.int64, len(self._long_rows)))]
        self._place(self._hash[rows], rows)

    def remove(self, device_ids: Sequence[str]) -> list[str]:
        """Forget the ids present (each once); returns them in the order given."""
        distinct = list(dict.fromkeys(device_ids))
        rows = self.lookup(distinct)
        present = [d for d, r in zip(distinct, rows.tolist(), strict=True) if r >= 0]
        if not present:
            return []
        hv, keys, long_pos = self._split(present)
        short = np.ones(len(present), np.bool_)
        for i in long_pos.tolist():
            short[i] = False
            self._long_rows.pop(self._long.pop(present[i]))
        _, slots = self._probe(hv[short], keys[short])
        self._table[slots] = _TOMB
        self._tombs += slots.size
        self._used -= slots.size
        gone = rows[rows >= 0]
        self._live[gone] = False
        self._hash[gone], self._key[gone] = 0, b""
        return present
