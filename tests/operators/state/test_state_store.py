"""Contract suite for per-device state stores (today :class:`DeviceStateStore`, on cpu and cuda).

Every test takes the ``make_store`` fixture, a factory ``make_store(hidden_size, n_channels, **kw)``; a new
backend is one more entry in :data:`BACKENDS`.  Values are written straight into ``store.tensors`` /
``store.host`` rows, so the round-trip checks cover every field a backend has, including future ones.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from liquidstream.operators.errors import StateFormatError
from liquidstream.operators.state.codec import FORMAT_VERSION, MAGIC, encode_snapshot
from liquidstream.operators.state.fields import GROWTH
from liquidstream.operators.state.store import DeviceStateStore

CUDA = torch.cuda.is_available()
StoreFactory = Callable[..., DeviceStateStore]




def _device_store(device: str) -> StoreFactory:
    def make(hidden_size: int, n_channels: int, **kw: Any) -> DeviceStateStore:
        return DeviceStateStore(hidden_size, n_channels, device=device, **kw)

    return make


#: One line per backend (a factory ``(hidden_size, n_channels, **kw) -> store``).
BACKENDS = [
    pytest.param(_device_store("cpu"), id="device-cpu"),
    pytest.param(_device_store("cuda"), id="device-cuda",
                 marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
]

#: Fields documented to start at 1 (variances, residual energies, calibration ratios) or -1 (commissioning:
#: the setting's length); every other field starts at 0.
NEUTRAL = {"var": 1, "calib": 1, "commissioning": -1} | {f"{k}_{f}": 1 for k in "dal" for f in ("s2", "v", "cal")}


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    factory: StoreFactory = request.param
    return factory


# ------------------------------------------------------------------------------------------------ helpers
def fill_random(store: DeviceStateStore, ids: list[str], seed: int) -> None:
    """Create the devices and write random values into every field of their rows."""
    rows, _ = store.rows_for(ids)
    g = torch.Generator().manual_seed(seed)
    idx = torch.as_tensor(rows, device=store.device)
    for t in store.tensors.values():
        shape = (len(ids), *t.shape[1:])
        if t.dtype == torch.bool:
            v = torch.rand(shape, generator=g) > 0.5
        elif t.dtype.is_floating_point:
            v = torch.randn(shape, generator=g, dtype=torch.float64).to(t.dtype)
        else:
            info = torch.iinfo(t.dtype)
            lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
            v = torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(t.dtype)
        t[idx] = v.to(t.device)
    rng = np.random.default_rng(seed)
    for a in store.host.values():
        if a.dtype.kind == "f":  # the sampling rhythm's statistics
            a[rows] = rng.standard_normal(len(ids)).astype(a.dtype)
            continue
        hi = min(np.iinfo(a.dtype).max, 2**45)
        a[rows] = rng.integers(1, hi, size=len(ids)).astype(a.dtype)


def row_fields(store: DeviceStateStore, device_id: str) -> dict[str, np.ndarray]:
    r = int(store.lookup([device_id])[0])
    assert r >= 0, f"{device_id!r} not in store"
    out = {n: t[r].cpu().numpy().copy() for n, t in store.tensors.items()}
    out.update({n: np.array(a[r]) for n, a in store.host.items()})
    return out


def assert_same_fields(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{what}: field {name} dtype {a[name].dtype} != {b[name].dtype}"
        assert np.array_equal(a[name], b[name]), f"{what}: field {name} differs: {a[name]} != {b[name]}"


def assert_neutral(store: DeviceStateStore, device_id: str) -> None:
    for name, value in row_fields(store, device_id).items():
        want = NEUTRAL.get(name, 0)
        assert np.all(value == want), f"new row of {device_id!r}: field {name} = {value}, want all {want}"


# ------------------------------------------------------------------------------------------------ rows
def test_rows_for_lookup_and_new_flags(make_store: StoreFactory) -> None:
    store = make_store(4, 2, initial_capacity=8)
    rows, new = store.rows_for(["a", "b", "a", "c"])
    assert rows[0] == rows[2] and len({int(r) for r in rows}) == 3
    assert new.tolist() == [True, True, True, True]
    assert len(store) == 3 and "b" in store and "z" not in store
    assert store.lookup(["c", "z", "a"]).tolist() == [rows[3], -1, rows[0]]
    store.host["count"][rows[1]] = 5  # "b" has applied readings now
    rows2, new2 = store.rows_for(["b", "d"])
    assert rows2[0] == rows[1] and new2.tolist() == [False, True]
    assert sorted(store.device_ids()) == ["a", "b", "c", "d"]
    for dev in ("a", "d"):
        assert_neutral(store, dev)


# ------------------------------------------------------------------------------------------------ snapshot
def test_snapshot_restore_round_trip_every_field(make_store: StoreFactory) -> None:
    src = make_store(5, 3, initial_capacity=4)
    ids = [f"dev-{i}" for i in range(11)]  # more than the initial capacity: snapshot after growth
    fill_random(src, ids, seed=1)
    blob = src.snapshot()
    dst = make_store(5, 3, initial_capacity=2)
    fill_random(dst, ["other"], seed=2)
    restored = dst.restore(blob)
    assert sorted(restored) == sorted(ids)
    assert sorted(dst.device_ids()) == sorted([*ids, "other"])
    for dev in ids:
        assert_same_fields(row_fields(src, dev), row_fields(dst, dev), dev)
    # Byte-identical when re-serialised, and deterministic.
    assert dst.snapshot(ids) == src.snapshot(ids) == blob


def test_restore_subset_and_unknown_ids_skipped(make_store: StoreFactory) -> None:
    src = make_store(3, 2)
    fill_random(src, ["a", "b", "c", "d"], seed=3)
    blob = src.snapshot(["d", "nope", "b"])
    dst = make_store(3, 2)
    assert dst.restore(blob) == ["d", "b"]
    assert sorted(dst.device_ids()) == ["b", "d"]
    for dev in ("b", "d"):
        assert_same_fields(row_fields(src, dev), row_fields(dst, dev), dev)


def test_restore_overwrites_existing_device(make_store: StoreFactory) -> None:
    src = make_store(3, 2)
    fill_random(src, ["a"], seed=4)
    dst = make_store(3, 2)
    fill_random(dst, ["b", "a"], seed=5)
    before_b = row_fields(dst, "b")
    dst.restore(src.snapshot())
    assert len(dst) == 2
    assert_same_fields(row_fields(src, "a"), row_fields(dst, "a"), "a overwritten")
    assert_same_fields(before_b, row_fields(dst, "b"), "b untouched")


def test_empty_snapshot(make_store: StoreFactory) -> None:
    src = make_store(3, 2)
    blob = src.snapshot()
    dst = make_store(3, 2)
    assert dst.restore(blob) == [] and len(dst) == 0


# ------------------------------------------------------------------------------------------------ growth
def test_growth_keeps_rows(make_store: StoreFactory) -> None:
    store = make_store(4, 3, initial_capacity=2)
    first = ["a", "b"]
    fill_random(store, first, seed=6)
    rows_before = store.lookup(first).tolist()
    kept = {d: row_fields(store, d) for d in first}
    capacities = [store.capacity]
    for i in range(30):
        store.rows_for([f"n{i}"])
        if store.capacity != capacities[-1]:
            capacities.append(store.capacity)
    # geometric growth (amortised O(1) copies) that never holds much more than it needs
    assert capacities[0] == 2 and capacities[-1] >= 32
    for small, big in zip(capacities, capacities[1:], strict=False):
        assert small * GROWTH <= big <= small * GROWTH + 1, capacities
    assert store.lookup(first).tolist() == rows_before
    for d in first:
        assert_same_fields(kept[d], row_fields(store, d), f"{d} after growth")
    for i in (0, 1, 13, 29):
        assert_neutral(store, f"n{i}")
    rows = store.lookup([f"n{i}" for i in range(30)] + first)
    assert len(set(rows.tolist())) == 32 and rows.min() >= 0 and rows.max() < store.capacity


# ------------------------------------------------------------------------------------------------ drop / evict
def test_drop_frees_and_reuses_rows_with_neutral_state(make_store: StoreFactory) -> None:
    store = make_store(4, 2, initial_capacity=4)
    fill_random(store, ["a", "b", "c", "d"], seed=7)
    row_b = int(store.lookup(["b"])[0])
    keep_a = row_fields(store, "a")
    assert store.drop(["b", "ghost"]) == ["b"]
    assert "b" not in store and len(store) == 3 and store.lookup(["b"]).tolist() == [-1]
    store.rows_for(["e"])
    assert store.capacity == 4, "a freed row must be reused before growing"
    assert int(store.lookup(["e"])[0]) == row_b
    assert_neutral(store, "e")  # nothing of b's random state leaks into e
    assert_same_fields(keep_a, row_fields(store, "a"), "a untouched by drop")
    assert store.drop([]) == []


def test_evict_idle_by_event_time(make_store: StoreFactory) -> None:
    store = make_store(2, 1)
    rows, _ = store.rows_for(["old", "edge", "fresh"])
    now, ttl = 1_700_000_100_000, 60.0
    store.host["last_ts_ms"][rows] = [now - 60_001, now - 60_000, now - 10]
    store.host["count"][rows] = 3
    assert store.evict_idle(now, ttl) == ["old"]
    assert sorted(store.device_ids()) == ["edge", "fresh"]
    assert store.evict_idle(now + 1, ttl) == ["edge"]
    assert store.evict_idle(now + 10**9, ttl) == ["fresh"]
    assert len(store) == 0 and store.evict_idle(now, ttl) == []


def test_memory_bounded_under_churn(make_store: StoreFactory) -> None:
    store = make_store(4, 2, initial_capacity=16)
    caps, sizes = [], []
    for rnd in range(25):
        ids = [f"r{rnd}-{i}" for i in range(100)]
        rows, _ = store.rows_for(ids)
        store.host["last_ts_ms"][rows] = rnd * 1000
        store.host["count"][rows] = 1
        evicted = store.evict_idle(rnd * 1000 + 10_000, ttl_s=1.0)
        assert sorted(evicted) == sorted(ids)
        caps.append(store.capacity)
        sizes.append(store.nbytes())
    assert len(store) == 0
    assert 100 <= caps[0] < 200 and set(caps) == {caps[0]}, caps  # freed rows reused, no growth
    assert len(set(sizes)) == 1


# ------------------------------------------------------------------------------------------------ format errors
def _blob(make_store: StoreFactory, h: int = 3, c: int = 2) -> bytes:
    src = make_store(h, c)
    fill_random(src, ["a", "b"], seed=8)
    return src.snapshot()


def _assert_refused(store: DeviceStateStore, blob: bytes, match: str | None = None) -> None:
    before = store.snapshot()
    with pytest.raises(StateFormatError, match=match):
        store.restore(blob)
    assert store.snapshot() == before, "a refused snapshot must leave the store unchanged"


def test_wrong_magic(make_store: StoreFactory) -> None:
    blob = _blob(make_store)
    _assert_refused(make_store(3, 2), b"XXSTATE\0" + blob[8:], match="magic")


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 65535])
def test_unsupported_version(make_store: StoreFactory, version: int) -> None:
    blob = _blob(make_store)
    assert struct.unpack_from("<H", blob, 8)[0] == FORMAT_VERSION
    _assert_refused(make_store(3, 2), blob[:8] + struct.pack("<H", version) + blob[10:], match="version")


@pytest.mark.parametrize(("h", "c"), [(4, 2), (3, 3), (2, 1)])
def test_different_hidden_size_or_channels(make_store: StoreFactory, h: int, c: int) -> None:
    _assert_refused(make_store(h, c), _blob(make_store, 3, 2))


def test_truncated_at_every_length_and_trailing_bytes(make_store: StoreFactory) -> None:
    blob = _blob(make_store, 2, 1)
    store = make_store(2, 1)
    for cut in range(len(blob)):
        with pytest.raises(StateFormatError):
            store.restore(blob[:cut])
    assert len(store) == 0
    _assert_refused(store, blob + b"\0")


def test_mistyped_or_missing_field(make_store: StoreFactory) -> None:
    src = make_store(3, 2)
    fill_random(src, ["a"], seed=9)
    good = src.snapshot()
    store = make_store(3, 2)
    store.restore(good)  # control: the fields below come from this very snapshot's layout
    arrays = {n: t.cpu().numpy()[:1] for n, t in src.tensors.items()} | {n: a[:1] for n, a in src.host.items()}
    wrong = dict(arrays, h=arrays["h"].astype(np.float64))
    _assert_refused(store, encode_snapshot(["a"], wrong, hidden_size=3, n_channels=2), match="'h'")
    missing = {k: v for k, v in arrays.items() if k != "calib"}
    _assert_refused(store, encode_snapshot(["a"], missing, hidden_size=3, n_channels=2), match="'calib'")


def _with_header(blob: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    import json

    hlen = struct.unpack_from("<I", blob, 10)[0]
    header = json.loads(blob[14:14 + hlen])
    edit(header)
    new = json.dumps(header).encode()
    return blob[:10] + struct.pack("<I", len(new)) + new + blob[14 + hlen:]


@pytest.mark.parametrize("bad_field", [["h", "<f4"], ["h", "no-such-dtype", [3]], ["h", "O", [3]], ["h", "<f4", [-3]],
                                       ["h", "<f4", ["x"]], "h"],
                         ids=["arity", "dtype-string", "object-dtype", "negative-dim", "bad-dim", "not-a-list"])
def test_malformed_field_entry(make_store: StoreFactory, bad_field: list[Any]) -> None:
    blob = _blob(make_store)

    def edit(header: dict[str, Any]) -> None:
        header["fields"][0] = bad_field

    assert _with_header(blob, lambda h: None) == blob  # the editor itself round-trips
    _assert_refused(make_store(3, 2), _with_header(blob, edit))


# ------------------------------------------------------------------------------------------------ no pickle
class _Boom:
    """Unpickling this creates a file: proof that a payload was executed."""

    path = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_snapshot_never_uses_pickle(make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    src = make_store(3, 2)
    fill_random(src, ["a", "b"], seed=10)

    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("pickle used")

    with monkeypatch.context() as m:
        for name in ("dumps", "loads", "dump", "load", "Pickler", "Unpickler"):
            m.setattr(pickle, name, forbidden)
        blob = src.snapshot()
        dst = make_store(3, 2)
        dst.restore(blob)
    assert blob.startswith(MAGIC)
    for dev in ("a", "b"):
        assert_same_fields(row_fields(src, dev), row_fields(dst, dev), dev)
    # A pickle payload, harmless or not, is refused before anything is unpickled.
    sentinel = tmp_path / "executed"
    boom = _Boom()
    boom.path = str(sentinel)
    for payload in (pickle.dumps({"h": np.zeros((1, 3), np.float32)}), pickle.dumps(boom)):
        _assert_refused(dst, payload, match="magic")
    assert not sentinel.exists() and not os.path.exists(sentinel)


# ------------------------------------------------------------------------------------------------ memory
def raw_row_bytes(h: int, c: int) -> int:
    """Bytes of one device row from the documented layout (state_store module docstring)."""
    f32, i64, i32, i16, b8 = 4, 8, 4, 2, 1
    return (h * f32  # h
            + 4 * c * f32  # x_last, mean, var, calib
            + 4 * f32  # score_mean, score_var, gap_ema, z2_fast
            + b8 + 2 * i64 + i32  # alert_open, alert_since_ms, cooldown_ms, calm
            + c * i16  # stuck
            + i64 + i32)  # host: last_ts_ms, count


def test_bytes_per_device_at_100k(make_store: StoreFactory) -> None:
    h, c, n = 64, 8, 100_000
    store = make_store(h, c)
    store.rows_for([f"d{i}" for i in range(n)])
    assert len(store) == n
    nbytes = store.nbytes()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in store.tensors.values()}
    held = sum(storages.values()) + sum(a.nbytes for a in store.host.values())  # fields share per-dtype blocks
    assert nbytes == held, "nbytes() must report what the arrays really hold"
    raw = raw_row_bytes(h, c)
    per_device = nbytes / n
    print(f"\n[state-store] {n} devices, H={h}, C={c}, device={store.device}: capacity {store.capacity}, "
          f"{nbytes / 2**20:.1f} MiB, {per_device:.1f} B/device (raw {raw} B/row, {per_device / raw:.2f}x)")
    assert n * raw <= nbytes < 2.5 * n * raw
