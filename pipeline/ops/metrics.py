"""Prometheus metrics of one worker process (a registry of its own, no module-level state).

The worker loop updates the metrics through a few verbs (:meth:`Metrics.observe_batch` once per batch,
:meth:`Metrics.set_lag`, :meth:`Metrics.set_devices`, :meth:`Metrics.set_restore_progress` on change,
:meth:`Metrics.set_model_version` at start-up and on every model swap, :meth:`Metrics.model_update` per
model-update record, :meth:`Metrics.trainer_decision` per trainer candidate).  Times are **seconds** on
the wire (Prometheus convention) although event times arrive as epoch milliseconds.
:class:`liquidstream.pipeline.ops.server.OpsServer` serves them over HTTP.

>>> m = Metrics()
>>> m.observe_batch(events=3, predictions=2, alerts=1, dead_letters_by_reason={"late": 1}, late=1,
...                 batch_seconds=0.02, event_ts_ms=[1_000, 1_500], publish_ms=2_000)
>>> m.value("liquidstream_predictions_total"), m.value("liquidstream_end_to_end_latency_seconds_count")
(2.0, 2.0)
>>> m.value("liquidstream_dead_letters_total", reason="late")
1.0
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from liquidstream.pipeline.wire.schemas import DeadLetterReason

__all__ = ["BATCH_BUCKETS_S", "LATENCY_BUCKETS_S", "PREFIX", "Metrics"]
log = logging.getLogger("liquidstream.metrics")
PREFIX = "liquidstream_"
#: Seconds from event time to publish: sensors buffer and networks stall, so the tail reaches minutes.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
#: Seconds one batch takes from decode to commit (100 ms is the default fill time of a batch).
BATCH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Label of a dead-letter reason that is not a :class:`DeadLetterReason` value (keeps cardinality bounded).
OTHER_REASON = "other"
_REASONS = frozenset(r.value for r in DeadLetterReason)
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"),
             "info": ("_info",)}


class _BulkHistogram(Collector):
    """A histogram fed a whole array per call: one numpy pass per batch instead of one ``observe()`` per event
    (5000 Python calls would cost milliseconds per batch)."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._counts = np.zeros(len(self._bounds) + 1, dtype=np.int64)  # last slot: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()  # observe in the worker thread, collect in the HTTP thread

    def observe_many(self, values: ArrayLike) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        # side="left": a value equal to a bound belongs to that bound's bucket (Prometheus' le = "<=").
        counts = np.bincount(np.searchsorted(self._bounds, v, side="left"), minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(v.sum())

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts), self._sum
        buckets = [(repr(float(b)), float(c)) for b, c in zip(self._bounds, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", float(cumulative[-1])))
        return [HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)]


class Metrics:
    """Every ``liquidstream_*`` metric of one process.  Thread-safe: updated by the worker loop, scraped by
    the HTTP thread.  Pass ``registry`` to share one with other collectors; by default it owns a new one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        self.events = Counter(f"{p}events_processed", "Input messages consumed and handled (valid or not)",
                              registry=r)
        self.predictions = Counter(f"{p}predictions", "Forecasts published (one per applied reading)", registry=r)
        self.alerts = Counter(f"{p}alerts", "Anomaly alerts published (one per incident)", registry=r)
        self.dead_letters = Counter(f"{p}dead_letters", "Messages sent to the dead-letter topic, by reason "
                                    "(DeadLetterReason value, or 'other')", ["reason"], registry=r)
        self.late = Counter(f"{p}late_events", "Readings older than their device's last applied one "
                            "(dead-lettered or applied, per the late policy)", registry=r)
        self.batch_seconds = Histogram(f"{p}batch_seconds", "Seconds per batch, decode to commit",
                                       buckets=BATCH_BUCKETS_S, registry=r)
        self.latency = _BulkHistogram(f"{p}end_to_end_latency_seconds", "Seconds from a reading's event "
                                      "time to the publish of its prediction (clock skew clamped at 0)",
                                      LATENCY_BUCKETS_S)
        r.register(self.latency)
        self.lag = Gauge(f"{p}consumer_lag", "Messages behind the end of each assigned input partition",
                         ["partition"], registry=r)
        self.devices = Gauge(f"{p}devices", "Devices with state held in memory", registry=r)
        self.model_version = Gauge(f"{p}model_version", "1 for the model version being served (label version)",
                                   ["version"], registry=r)
        self.restore_progress = Gauge(f"{p}restore_progress", "Fraction 0..1 of the assigned partitions' "
                                      "device state restored from the changelog (1 = serving)", registry=r)
        # Model updates (liquidstream.pipeline.updates.follower): what serving workers adopted or rejected, and why;
        # what the trainer decided about each candidate.  Reasons are fixed enums: the label sets stay small.
        self.model_updates = Counter(f"{p}model_updates", "Model-update records a serving worker handled, by result "
                                     "(adopted, rejected) and reason (ok, or why it was rejected: unsigned, "
                                     "bad_signature, stale, tampered, incompatible, malformed, no_key ...)",
                                     ["result", "reason"], registry=r)
        self.trainer_candidates = Counter(f"{p}trainer_candidates", "Candidate models the trainer evaluated, by "
                                          "decision reason (accepted, rollback, no_improvement ...)", ["reason"],
                                          registry=r)
        self.trainer_buffer_windows = Gauge(f"{p}trainer_buffer_windows", "Windows in the trainer's replay buffer",
                                            registry=r)
        self._version: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ verbs
    def observe_batch(self, *, events: int, predictions: int, alerts: int,
                      dead_letters_by_reason: Mapping[str, int], late: int, batch_seconds: float,
                      event_ts_ms: ArrayLike | None = None, publish_ms: int | None = None) -> None:
        """Count one handled batch.  ``event_ts_ms``: epoch-ms event times of the published predictions;
        ``publish_ms``: epoch ms when they were acknowledged (both or neither)."""
        self.events.inc(events)
        self.predictions.inc(predictions)
        self.alerts.inc(alerts)
        for reason, count in dead_letters_by_reason.items():
            if count:
                self.dead_letters.labels(reason if reason in _REASONS else OTHER_REASON).inc(count)
        self.late.inc(late)
        self.batch_seconds.observe(batch_seconds)
        if event_ts_ms is not None and publish_ms is not None:
            ts = np.asarray(event_ts_ms, dtype=np.float64)
            # An event time ahead of this host's clock (skew, allowed up to max_future_s) counts as 0 s.
            self.latency.observe_many(np.maximum(publish_ms - ts, 0.0) / 1000.0)

    def set_lag(self, partition: int, lag: int) -> None:
        """Messages between the committed offset and the end of ``partition`` (negative = unknown: skipped)."""
        if lag >= 0:
            self.lag.labels(str(partition)).set(lag)

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """Drop the lag series of revoked partitions: their new owner reports them."""
        for partition in partitions:
            try:
                self.lag.remove(str(partition))
            except KeyError:
                pass

    def set_devices(self, n: int) -> None:
        self.devices.set(n)

    def set_model_version(self, version: str) -> None:
        with self._lock:  # exactly one version series is 1 at any time
            if self._version is not None and self._version != version:
                self.model_version.remove(self._version)
            self._version = version
            self.model_version.labels(version).set(1)

    def model_update(self, result: str, reason: str) -> None:
        """Count one model-update record a serving worker adopted (reason ``ok``) or rejected."""
        self.model_updates.labels(result, reason).inc()

    def trainer_decision(self, reason: str, buffer_windows: int) -> None:
        """Count one candidate decision of the trainer and record its replay-buffer size."""
        self.trainer_candidates.labels(reason).inc()
        self.trainer_buffer_windows.set(buffer_windows)

    def set_restore_progress(self, fraction: float) -> None:
        self.restore_progress.set(min(max(fraction, 0.0), 1.0))

    # ------------------------------------------------------------------------------------------ reading
    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def series_names(self) -> frozenset[str]:
        """Every sample name these metrics can expose (``_total``, ``_bucket`` ... included), even for
        labelled metrics that have no sample yet; dashboards and alert rules may use only these."""
        # registry.collect() yields a family even for a labelled metric with no child yet.
        return frozenset(f"{fam.name}{suffix}" for fam in self.registry.collect()
                         for suffix in _SUFFIXES[fam.type])

    def value(self, name: str, **labels: str) -> float | None:
        """The current value of one sample (tests, debugging); None when absent."""
        return self.registry.get_sample_value(name, labels)
