"""Host-side planning of one batch: event-time order, policies, and batched waves.

Given the store rows and event times of N events, :func:`plan_waves` decides (vectorised in numpy, no
per-event Python loop) which events are applied, with which time step, and in which *wave*: wave ``k``
holds the ``k``-th applied event of every device in the batch, so each wave is one cell call over distinct
devices and a device's events are applied in event-time order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.result import EventStatus

_NO_PREVIOUS = np.iinfo(np.int64).min


@dataclass(frozen=True)
class WavePlan:
    """Applied events in wave order (M of them), plus per-input-event status."""

    status: np.ndarray  # int8 [N] in input order
    long_gap: np.ndarray  # bool [N] in input order
    source: np.ndarray  # int64 [M]: input position of each applied event, wave order
    rows: np.ndarray  # int64 [M]: store row
    dt_s: np.ndarray  # float32 [M]: seconds since the device's previous applied event (0 for a first)
    reset: np.ndarray  # bool [M]: zero the hidden state first (gap_policy="reset" on a long gap)
    count_before: np.ndarray  # int64 [M]: readings the device had applied before this one
    bounds: np.ndarray  # int64 [K+1]: wave k is source[bounds[k]:bounds[k+1]]
    # Per device with an applied event (D of them), for the host clocks after the batch:
    last_rows: np.ndarray  # int64 [D]: store row
    last_ts_ms: np.ndarray  # int64 [D]: latest applied event time, epoch ms
    count_after: np.ndarray  # int64 [D]: readings applied once the batch is done
    # The same events device by device (the compiled step's order): device d (row last_rows[d]) owns the wave-order
    # positions device_order[device_starts[d]:device_starts[d + 1]], in event order.
    device_order: np.ndarray  # int64 [M]
    device_starts: np.ndarray  # int64 [D + 1]

    @property
    def n_waves(self) -> int:
        return int(self.bounds.shape[0]) - 1


def _by_row_then_time(rows: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
    """Order by device row, then event time, then arrival.

    Events usually arrive in event-time order per device, and then a stable sort by row alone is that
    order: radix sorts over 16-bit digits (numpy sorts uint16 stably in linear time) take 0.2 ms for 20,000
    events where the lexsort takes 1.8 ms.  A device with an event out of order falls back to the lexsort.
    """
    n = rows.shape[0]
    top = int(rows.max())
    if top >= 2**32:
        return np.lexsort((np.arange(n), ts_ms, rows))
    order = np.argsort((rows & 0xFFFF).astype(np.uint16), kind="stable")
    if top >= 2**16:  # second digit (least significant first keeps the sort stable)
        order = order[np.argsort((rows[order] >> 16).astype(np.uint16), kind="stable")]
    r, t = rows[order], ts_ms[order]
    if np.any((r[1:] == r[:-1]) & (t[1:] < t[:-1])):
        return np.lexsort((np.arange(n), ts_ms, rows))
    return order


def plan_waves(rows: np.ndarray, ts_ms: np.ndarray, last_ts_ms: np.ndarray, count: np.ndarray,
               settings: OperatorSettings) -> WavePlan:
    """Plan a batch. ``last_ts_ms``/``count`` are the store's host arrays (indexed by row).

    >>> plan = plan_waves(np.array([0, 1, 0, 0]), np.array([2000, 5000, 1000, 1000]),
    ...                   np.zeros(2, np.int64), np.zeros(2, np.int32), OperatorSettings())
    >>> [EventStatus(s).label for s in plan.status]
    ['ok', 'first', 'first', 'duplicate_dropped']
    >>> plan.source.tolist(), plan.dt_s.tolist(), plan.bounds.tolist()
    ([2, 1, 0], [0.0, 0.0, 1.0], [0, 2, 3])
    >>> plan.device_order.tolist(), plan.device_starts.tolist()  # device 0: waves 0 and 1; device 1: wave 0
    ([0, 2, 1], [0, 2, 3])
    """
    n = rows.shape[0]
    if n == 0:
        empty = np.zeros(0, np.int64)
        return WavePlan(np.zeros(0, np.int8), np.zeros(0, bool), empty, empty, np.zeros(0, np.float32),
                        np.zeros(0, bool), empty, np.zeros(1, np.int64), empty, empty, empty, empty,
                        np.zeros(1, np.int64))
    order = _by_row_then_time(rows, ts_ms)
    r, t = rows[order], ts_ms[order]
    first_in_group = np.ones(n, dtype=bool)
    first_in_group[1:] = r[1:] != r[:-1]
    known = count[r] > 0
    stored = np.where(known, last_ts_ms[r], _NO_PREVIOUS)
    prev_in_group = np.empty(n, dtype=np.int64)
    prev_in_group[0] = _NO_PREVIOUS
    prev_in_group[1:] = t[:-1]
    # Previous applied time: sorted order makes it the max of the stored clock and the previous event.
    prev = np.where(first_in_group, stored, np.maximum(prev_in_group, stored))
    has_prev = prev != _NO_PREVIOUS
    late = has_prev & (t < stored)
    dup = has_prev & ~late & (t == prev)
    status = np.where(has_prev, EventStatus.OK, EventStatus.FIRST).astype(np.int8)
    drop_dup = settings.duplicate_policy == "drop"
    status[dup] = EventStatus.DUPLICATE_DROPPED if drop_dup else EventStatus.DUPLICATE_ACCEPTED
    status[late] = EventStatus.LATE_DROPPED if settings.late_policy == "drop" else EventStatus.LATE_ACCEPTED
    applied = (status != EventStatus.DUPLICATE_DROPPED) & (status != EventStatus.LATE_DROPPED)
    # A dropped first event cannot happen: a device's first event has no previous time to conflict with.
    dt_ms = np.where(has_prev, np.maximum(t - np.where(has_prev, prev, 0), 0), 0)
    dt_s = dt_ms.astype(np.float64) / 1000.0  # ms -> s
    long_gap = dt_s > settings.max_gap_s
    if settings.gap_policy == "clamp":
        dt_s = np.minimum(dt_s, settings.max_gap_s)
    reset = long_gap & (settings.gap_policy == "reset")

    acc = np.flatnonzero(applied)
    ra = r[acc]
    starts = np.ones(acc.shape[0], dtype=bool)
    starts[1:] = ra[1:] != ra[:-1]
    pos = np.arange(acc.shape[0])
    rank = pos - np.maximum.accumulate(np.where(starts, pos, 0))
    # By rank, then row: ``ra`` is already sorted, so a stable sort by rank alone keeps the rows in order
    # (a radix sort when the ranks fit int16: 6x faster than a lexsort over 20,000 events).
    wave_order = np.argsort(rank.astype(np.int16) if acc.shape[0] < 2**15 else rank, kind="stable")
    sel = acc[wave_order]
    ranks = rank[wave_order]
    bounds = np.searchsorted(ranks, np.arange(int(ranks[-1]) + 2 if ranks.size else 1))

    status_in = np.empty(n, dtype=np.int8)
    status_in[order] = status
    gap_in = np.empty(n, dtype=bool)
    gap_in[order] = long_gap & applied
    ends = np.ones(acc.shape[0], dtype=bool)  # each device's last applied event: the latest, being sorted
    ends[:-1] = starts[1:]
    device_order = np.empty(acc.shape[0], np.int64)  # wave position of each applied event, in (row, time) order
    device_order[wave_order] = np.arange(acc.shape[0])
    device_starts = np.append(np.flatnonzero(starts), acc.shape[0]).astype(np.int64)
    return WavePlan(status=status_in, long_gap=gap_in, source=order[sel], rows=r[sel],
                    dt_s=dt_s[sel].astype(np.float32), reset=reset[sel],
                    count_before=count[r[sel]].astype(np.int64) + ranks, bounds=bounds.astype(np.int64),
                    last_rows=ra[ends], last_ts_ms=t[acc[ends]],
                    count_after=count[ra[ends]].astype(np.int64) + rank[ends] + 1,
                    device_order=device_order, device_starts=device_starts)
