"""Cuts each device's stream of readings into training windows of ``window`` consecutive readings.

Per tracked device the assembler holds one window being filled (values, real gaps in seconds, learn flags)
and the device's state at that window's start.  When a window fills up, ``feed`` hands every full window of
the round to a callback, which rolls them through the serving model and returns each device's state at the
end; that state starts the device's next window, so windows chain exactly like truncated BPTT and a device
sending many readings per batch is cut into as many windows.  Memory is bounded: at most ``max_devices``
devices are tracked (readings of others are skipped until a tracked device goes idle), in preallocated
arrays grown by doubling up to that bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: Start-state fields of a window (name, shape kind: "H" hidden, "C" channels, "" scalar), all float32, in
#: the order of :data:`liquidstream.operators.training.State`.
STATE_FIELDS = (("h", "H"), ("x_last", "C"), ("mean", "C"), ("var", "C"), ("count", ""))


@dataclass(frozen=True)
class FullWindows:
    """Windows completed in one round of :meth:`WindowAssembler.feed` (K windows)."""

    device_ids: list[str]
    values: np.ndarray  # float32 [K, T, C], raw units
    dt: np.ndarray  # float32 [K, T], seconds
    learn: np.ndarray  # bool [K, T]
    frozen: np.ndarray  # bool [K, T]: the operator froze the running statistics (inside an alert)
    state: dict[str, np.ndarray]  # start state per field, float32 [K, ...]


class WindowAssembler:
    """Pending windows of up to ``max_devices`` devices.

    >>> asm = WindowAssembler(window=2, n_channels=1, hidden_size=3, max_devices=10)
    >>> asm.track(["a"], asm.blank_state(1), np.array([-1]))
    >>> seen = []
    >>> def done(full):
    ...     seen.append((full.device_ids, full.dt.tolist()))
    ...     return full.state
    >>> asm.feed(["a"] * 5, np.arange(5) * 1500, np.zeros((5, 1), np.float32), np.ones(5, bool), done)
    5
    >>> seen  # two full windows; the fifth reading waits in the next one
    [(['a'], [[0.0, 1.5]]), (['a'], [[1.5, 1.5]])]
    """

    def __init__(self, *, window: int, n_channels: int, hidden_size: int, max_devices: int,
                 initial_capacity: int = 1024) -> None:
        self.window, self.n_channels, self.hidden_size = int(window), int(n_channels), int(hidden_size)
        self.max_devices = int(max_devices)
        self._index: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._free: list[int] = []
        self._arrays: dict[str, np.ndarray] = {}
        self._grow(min(max(1, initial_capacity), self.max_devices))

    def _shapes(self, rows: int) -> dict[str, tuple[tuple[int, ...], type[np.generic]]]:
        w, c, hid = self.window, self.n_channels, self.hidden_size
        dims = {"H": (hid,), "C": (c,), "": ()}
        shapes: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
            "values": ((rows, w, c), np.float32), "dt": ((rows, w), np.float32), "learn": ((rows, w), np.bool_),
            "frozen": ((rows, w), np.bool_), "fill": ((rows,), np.int64), "last_ts": ((rows,), np.int64),
            "in_alert": ((rows,), np.bool_)}
        shapes.update({f"state_{n}": ((rows, *dims[k]), np.float32) for n, k in STATE_FIELDS})
        return shapes

    def _grow(self, capacity: int) -> None:
        old = len(self._ids)
        for name, (shape, dtype) in self._shapes(capacity).items():
            fresh = np.zeros(shape, dtype)
            if old:
                fresh[:old] = self._arrays[name]
            self._arrays[name] = fresh
        self._ids.extend([None] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._index

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def blank_state(self, n: int) -> dict[str, np.ndarray]:
        """The start state of ``n`` devices never seen (variance 1, everything else 0)."""
        st = {n_: np.zeros(shape, dtype) for n_, (shape, dtype) in self._shapes(n).items() if n_.startswith("state_")}
        st["state_var"][:] = 1.0
        return {k.removeprefix("state_"): v for k, v in st.items()}

    def untracked(self, device_ids: Sequence[str]) -> list[str]:
        """Distinct devices among ``device_ids`` not tracked yet, in first-seen order."""
        return [d for d in dict.fromkeys(device_ids) if d not in self._index]

    def track(self, device_ids: Sequence[str], state: dict[str, np.ndarray], last_ts_ms: np.ndarray,
              in_alert: np.ndarray | None = None) -> None:
        """Start tracking devices (as many as fit) from their state; ``last_ts_ms`` -1 = no reading yet;
        ``in_alert``: an alert is open on the device (default: none)."""
        for i, dev in enumerate(device_ids):
            if dev in self._index or len(self._index) >= self.max_devices:
                continue
            if not self._free:
                self._grow(min(2 * len(self._ids), self.max_devices))
            row = self._free.pop()
            self._index[dev], self._ids[row] = row, dev
            for name, _ in STATE_FIELDS:
                self._arrays[f"state_{name}"][row] = state[name][i]
            self._arrays["fill"][row] = 0
            self._arrays["last_ts"][row] = last_ts_ms[i]
            self._arrays["in_alert"][row] = False if in_alert is None else in_alert[i]

    def evict_idle(self, now_ms: int, ttl_s: float) -> int:
        """Stop tracking devices with no reading for ``ttl_s`` seconds of event time; returns how many."""
        cut = now_ms - int(ttl_s * 1000)
        idle = [d for d, r in self._index.items() if self._arrays["last_ts"][r] < cut]
        for dev in idle:
            row = self._index.pop(dev)
            self._ids[row] = None
            self._free.append(row)
        return len(idle)

    def feed(self, device_ids: Sequence[str], ts_ms: np.ndarray, values: np.ndarray, learn: np.ndarray,
             complete: Callable[[FullWindows], dict[str, np.ndarray]], in_alert: np.ndarray | None = None) -> int:
        """Append applied readings (any order; sorted per device by event time here) of tracked devices.

        ``in_alert`` [N] (default: all False): an alert is open after the reading (``StepResult.is_alert``);
        the operator froze its statistics on a reading when an alert was open before or after it.
        ``complete(full)`` gets each round's full windows and returns their end states (same fields);
        returns how many readings were taken (those of untracked devices are not).
        """
        get = self._index.get
        rows = np.fromiter((get(d, -1) for d in device_ids), np.int64, count=len(device_ids))
        keep = rows >= 0
        rows, ts = rows[keep], np.asarray(ts_ms, np.int64)[keep]
        vals, lrn = np.asarray(values, np.float32)[keep], np.asarray(learn, bool)[keep]
        alert = np.zeros(len(device_ids), bool) if in_alert is None else np.asarray(in_alert, bool)
        alert = alert[keep]
        if rows.size == 0:
            return 0
        order = np.lexsort((ts, rows))
        rows, ts, vals, lrn, alert = rows[order], ts[order], vals[order], lrn[order], alert[order]
        a = self._arrays
        starts = np.ones(rows.size, bool)
        starts[1:] = rows[1:] != rows[:-1]
        prev = np.empty_like(ts)
        prev[1:] = ts[:-1]
        prev[starts] = a["last_ts"][rows[starts]]
        dt = np.where(prev < 0, 0.0, np.maximum(ts - prev, 0) / 1000.0).astype(np.float32)  # ms -> s
        was_open = np.empty_like(alert)
        was_open[1:] = alert[:-1]
        was_open[starts] = a["in_alert"][rows[starts]]
        frozen = alert | was_open
        ends = np.append(starts[1:], True)
        a["last_ts"][rows[ends]] = ts[ends]
        a["in_alert"][rows[ends]] = alert[ends]
        pos = np.arange(rows.size)
        k = pos - np.maximum.accumulate(np.where(starts, pos, 0))  # rank within the device, in time order
        absolute = a["fill"][rows] + k
        chunk, at = absolute // self.window, absolute % self.window
        for r in range(int(chunk.max()) + 1):
            sel = chunk == r
            rs, ps = rows[sel], at[sel]
            a["values"][rs, ps], a["dt"][rs, ps], a["learn"][rs, ps] = vals[sel], dt[sel], lrn[sel]
            a["frozen"][rs, ps] = frozen[sel]
            np.maximum.at(a["fill"], rs, ps + 1)
            full = np.unique(rs[a["fill"][rs] == self.window])
            if full.size:
                windows = FullWindows([str(self._ids[f]) for f in full.tolist()], a["values"][full].copy(),
                                      a["dt"][full].copy(), a["learn"][full].copy(), a["frozen"][full].copy(),
                                      {n: a[f"state_{n}"][full].copy() for n, _ in STATE_FIELDS})
                end = complete(windows)
                for name, _ in STATE_FIELDS:
                    a[f"state_{name}"][full] = end[name]
                a["fill"][full] = 0
        return int(rows.size)
