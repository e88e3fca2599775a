"""DeviceIndex against a dict reference: random inserts, removals and lookups, forced hash collisions,
non-ASCII and over-long ids, tombstones and table rebuilds."""

from __future__ import annotations

import numpy as np
import pytest

from liquidstream.operators.state.device_index import MAX_WIDTH, DeviceIndex


def _weak_hash(device_id: str) -> int:
    return len(device_id) % 3  # three buckets: every probe walks long clusters of colliding hashes


@pytest.mark.parametrize("weak", [False, True], ids=["python-hash", "colliding-hash"])
def test_matches_dict_under_random_churn(weak: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if weak:
        monkeypatch.setattr(DeviceIndex, "hash_fn", staticmethod(_weak_hash))
    rng = np.random.default_rng(0)
    pool = [f"dev-{i}" for i in range(300)] + ["pompe-é", "泵-7", "x" * (MAX_WIDTH + 5), "y" * (MAX_WIDTH + 9), "a"]
    capacity = 400
    index, ref, free = DeviceIndex(capacity), dict[str, int](), list(range(capacity))
    for step in range(60):
        batch = [pool[i] for i in rng.integers(0, len(pool), size=40)]
        got = index.lookup(batch)
        assert got.tolist() == [ref.get(d, -1) for d in batch], f"step {step}"
        new = [d for d in dict.fromkeys(batch) if d not in ref]
        rows = [free.pop() for _ in new]
        index.insert(new, np.array(rows, np.int64))
        ref.update(zip(new, rows, strict=True))
        if step % 3 == 2:  # drop a few (tombstones), sometimes an unknown id and a repeat
            gone = [pool[i] for i in rng.integers(0, len(pool), size=15)] + ["never-seen"]
            removed = index.remove(gone)
            assert removed == [d for d in dict.fromkeys(gone) if d in ref]
            for d in removed:
                free.append(ref.pop(d))
        assert len(index) == len(ref)
        live = index.live_rows()
        assert sorted(index.ids_of(live)) == sorted(ref) and sorted(live.tolist()) == sorted(ref.values())
    assert all(d in index for d in ref) and "never-seen" not in index


def test_grow_keeps_entries_and_rebuild_drops_tombstones() -> None:
    index = DeviceIndex(4)
    index.insert(["a", "b", "c"], np.array([0, 1, 2]))
    index.grow(5000)
    ids = [f"d{i}" for i in range(3, 5000)]
    index.insert(ids, np.arange(3, 5000))
    assert index.lookup(["a", "c", "d4999", "zz"]).tolist() == [0, 2, 4999, -1]
    assert index.remove(ids[:4000]) == ids[:4000]
    index.insert([f"e{i}" for i in range(3000)], np.arange(3, 3003))  # reuses rows and tombstoned slots
    assert len(index) == 3 + 997 + 3000
    assert index.lookup(["e0", "d3", "d4999", "b"]).tolist() == [3, -1, 4999, 1]
    assert index.nbytes() < 5000 * 40, "compact: well under a dict's ~150 bytes per id"
