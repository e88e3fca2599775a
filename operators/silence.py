"""Silence alerts: a device that stops reporting for much longer than its own rhythm.

Each device learns its sampling rhythm from the gaps between its readings, as the mean ``gap_log_m`` and variance
``gap_log_v`` of the logarithm of the gap in seconds (host fields of the store, float32; log: gaps are positive and
their spread is relative), over about its last :data:`MEMORY` gaps.  Its *usual gap* is
``exp(m + 2 sqrt(v))`` seconds (a gap longer than about 97% of its gaps), and the device is *silent* once the stream
has moved on by ``silence_after_gaps`` usual gaps since its last reading (``OperatorSettings.silence_after_gaps``,
0 turns silence alerts off).  Nothing is judged before :data:`MIN_GAPS` gaps were learnt.

A silence starts at ``last reading + silence_after_gaps x usual gap`` (its ``opened_ts``, so the alert id does not
depend on when it was noticed) and ends with the device's next reading.  It is noticed either by
:meth:`SilenceWatch.check` (the caller's stream time passed that instant: the replay after each batch, the worker
after each batch and on a timer) or by that next reading itself when nobody checked in between; either way one
opened and one closed record.  ``silence_ms`` (host, int64) holds the start of the open silence (0: none), so it
survives a snapshot and restore like every other field.  Gaps that were silences do not teach the rhythm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from liquidstream.operators.compiled.kernel import cached_jit
from liquidstream.operators.state.store import DeviceStateStore

__all__ = ["MEMORY", "MIN_GAPS", "RELEARN", "Silence", "SilenceWatch"]

MIN_GAPS = 16  # gaps a device needs before its silences are judged
MEMORY = 256  # the rhythm forgets like a running mean over about this many gaps
RELEARN = 3  # silent gaps in a row after which the device is taken to have changed its rate


@dataclass(frozen=True)
class Silence:
    """One silence of one device: its store row, its last reading and the silence's start (epoch ms), and, once
    over, the reading that ended it (``end_ms``; ``index``: its position in the ``process`` input; -1 while open)."""

    row: int
    last_ms: int
    start_ms: int
    usual_gap_s: float
    end_ms: int = 0
    index: int = -1
    noticed: bool = True  # opened by check() before the reading that ended it (else: opened and ended by it)

    def gaps(self, now_ms: int) -> float:
        """How many usual gaps the device has been silent at ``now_ms`` (epoch ms), from its last reading."""
        return (now_ms - self.last_ms) / 1000.0 / self.usual_gap_s


class SilenceWatch:
    """The rhythm and silences of every device of ``store`` (see the module docstring)."""

    def __init__(self, store: DeviceStateStore, after_gaps: float) -> None:
        self.store, self.after = store, after_gaps

    def usual_gap_s(self, rows: np.ndarray) -> np.ndarray:
        """float64 [len(rows)]: each device's usual gap in seconds (inf before :data:`MIN_GAPS` gaps)."""
        h = self.store.host
        m, v = h["gap_log_m"][rows].astype(np.float64), h["gap_log_v"][rows].astype(np.float64)
        return np.where(h["gap_n"][rows] >= MIN_GAPS, np.exp(m + 2.0 * np.sqrt(np.maximum(v, 0.0))), np.inf)

    def observe(self, rows: np.ndarray, source: np.ndarray, ts_ms: np.ndarray, dt_s: np.ndarray) -> list[Silence]:
        """One batch's applied readings (store rows, input positions, event times ms, gaps s; any order), before
        the device clocks move: the silences they end.  Each device's readings are taken in time order, one by
        one (:func:`_observe_run`), so the outcome does not depend on where batches begin and end."""
        if rows.size == 0:
            return []
        h = self.store.host
        order = np.lexsort((ts_ms, rows))  # each device's readings in time order
        rows_o, ts_o = rows[order], ts_ms[order]
        prev = h["last_ts_ms"][rows_o].copy()  # each reading's previous one: the clock, or the batch's reading before
        same = np.flatnonzero(rows_o[1:] == rows_o[:-1]) + 1
        prev[same] = ts_o[same - 1]
        ends = _observe_run(rows_o, dt_s[order].astype(np.float64), prev, h["gap_n"], h["gap_log_m"],
                            h["gap_log_v"], h["gap_quiet"], h["silence_ms"], float(self.after))
        out = []
        for k, start, usual, noticed in ends:
            out.append(Silence(int(rows_o[k]), int(prev[k]), int(start), float(usual), int(ts_o[k]),
                               int(source[order[k]]), bool(noticed)))
        return out

    def check(self, now_ms: int, rows: np.ndarray) -> list[Silence]:
        """Silences of ``rows`` that started at or before ``now_ms`` (stream time, epoch ms) and were not open
        yet: they open now (``silence_ms`` set)."""
        h = self.store.host
        rows = rows[(h["silence_ms"][rows] == 0) & (h["count"][rows] > 0)]
        usual = self.usual_gap_s(rows)
        finite = np.isfinite(usual)
        wait_ms = np.where(finite, np.round(self.after * np.where(finite, usual, 0.0) * 1000.0), 0).astype(np.int64)
        start = h["last_ts_ms"][rows] + wait_ms
        due = np.flatnonzero(finite & (start <= now_ms))
        out = []
        for k in due.tolist():
            row, at = int(rows[k]), int(start[k])
            h["silence_ms"][row] = at
            out.append(Silence(row, int(h["last_ts_ms"][row]), at, float(usual[k])))
        return out


@cached_jit
def _observe_run(rows: np.ndarray, dt: np.ndarray, prev: np.ndarray, gap_n: np.ndarray,
                 gap_m: np.ndarray, gap_v: np.ndarray, quiet: np.ndarray, silence_ms: np.ndarray,
                 after: float) -> list[tuple[int, int, float, bool]]:  # pragma: no cover - compiled
    """Readings sorted by (row, time): end silences and learn the rhythm, reading by reading.

    Returns (position, silence start ms, usual gap s, noticed) per silence ended.  A gap of more than ``after``
    usual gaps is a silence and teaches nothing, unless it is the :data:`RELEARN`-th in a row: the device changed
    its rate, and its rhythm starts over from that gap.  The statistics are an exponentially weighted mean and
    variance of log(gap) whose weight settles at 1/MEMORY (float32 in the store, float64 here).
    """
    out = []
    for k in range(rows.shape[0]):
        r, g = rows[k], dt[k]
        if g <= 0.0:  # a first, a duplicate or a late reading accepted: no gap to judge or learn
            continue
        n, m, v = int(gap_n[r]), float(gap_m[r]), float(gap_v[r])
        usual = math.exp(m + 2.0 * math.sqrt(max(v, 0.0))) if n >= MIN_GAPS else math.inf
        silent = g > after * usual
        if silence_ms[r] != 0:  # noticed by check(): this reading ends it
            out.append((k, int(silence_ms[r]), usual, True))
            silence_ms[r] = 0
        elif silent:  # nobody noticed: it began after * usual after the previous reading
            out.append((k, int(prev[k]) + int(np.round(after * usual * 1000.0)), usual, False))
        if silent:
            quiet[r] += 1
            if quiet[r] < RELEARN:
                continue
            n, m, v = 0, 0.0, 0.0
        quiet[r] = 0
        lg = math.log(g)
        if n == 0:
            m, v = lg, 0.0
        else:
            w = float(min(n + 1, MEMORY))
            d = lg - m
            m += d / w
            v = (1.0 - 1.0 / w) * (v + d * d / w)
        gap_n[r], gap_m[r], gap_v[r] = min(n + 1, 2**31 - 1), m, v
    return out
