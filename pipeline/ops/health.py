"""Liveness, readiness and the broker watch of a worker process (served by
:class:`liquidstream.pipeline.ops.server.OpsServer`).

* :class:`Health`: liveness; the worker loop calls :meth:`Health.beat` on every turn, ``/healthz`` is 503
  once it has not for ``max_silence_s`` (a stuck loop is restarted by the orchestrator).
* :class:`Readiness`: ``/readyz`` is 200 once the group assigned this member its partitions, each one's state
  is restored and a broker is reachable, else 503 with the reason.
* :class:`BrokerWatch`: a librdkafka ``error_cb``/``stats_cb`` pair.  It turns an authentication failure into
  a :class:`~liquidstream.pipeline.errors.ConfigurationError` raised from the client call that served the callback
  (``consume``, ``poll``, a short ``flush``), tracks whether a broker is up, and feeds per-partition lag.
* :func:`preflight`: authenticate once before any long-lived client exists, so bad credentials end a command
  within seconds with one clear line instead of timeouts half a minute later.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.settings import Settings

if TYPE_CHECKING:  # metrics imports this module at run time (the HTTP server serves Health)
    from liquidstream.pipeline.ops.metrics import Metrics

__all__ = ["BrokerWatch", "Health", "Readiness", "ReadyCheck", "preflight"]

log = logging.getLogger("liquidstream.health")
#: A readiness check: True/False, or (ready, reason shown on /readyz when not ready).
ReadyCheck = Callable[[], bool | tuple[bool, str]]
_AUTH_ERRORS = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED})
#: Milliseconds between librdkafka statistics callbacks (broker state, partition lag) when asked for.
STATS_INTERVAL_MS = 5000


class Health:
    """Liveness: the worker loop calls :meth:`beat` on every turn, busy or idle (monotonic seconds)."""

    def __init__(self, max_silence_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_silence_s, self._clock = max_silence_s, clock
        self._last = clock()  # start-up counts as a beat: model loading may take a while

    def beat(self) -> None:
        self._last = self._clock()

    def silence_s(self) -> float:
        return self._clock() - self._last

    def alive(self) -> bool:
        return self.silence_s() <= self.max_silence_s


class BrokerWatch:
    """librdkafka callbacks shared by a process's clients: ``conf | watch.callbacks()``.

    The first authentication failure raises :class:`ConfigurationError` from inside the callback, so the
    client call that served it raises (``flush(t)`` only when ``t`` ends: flush in short slices); later ones
    are only recorded (a ``close()`` must not raise) and :meth:`check` raises them again.
    """

    def __init__(self, metrics: Metrics | None = None, *, topic: str | None = None) -> None:
        self.metrics, self.topic = metrics, topic
        # Joining the group already proves contact, so assume reachable until librdkafka reports every broker
        # down; statistics (when enabled on some client) then keep it current in both directions.
        self.reachable = True
        self.failure: str | None = None
        self.last_error: str | None = None
        #: partition -> offset the application committed last (see :meth:`committed`).
        self.commits: dict[int, int] = {}

    def committed(self, offsets: Mapping[int, int]) -> None:
        """Offsets of ``topic`` just committed by the application (after each batch).  Lag counts from these:
        under exactly-once the producer's transaction commits them, and librdkafka's own ``consumer_lag``
        keeps counting from the offset the consumer fetched at assignment."""
        self.commits.update(offsets)

    def forget(self, partitions: Iterable[int]) -> None:
        """Revoked partitions: their commits are no longer this member's to report."""
        for partition in partitions:
            self.commits.pop(partition, None)

    def callbacks(self, *, stats: bool = True) -> dict[str, Any]:
        conf: dict[str, Any] = {"error_cb": self.error_cb}
        if stats:
            conf |= {"stats_cb": self.stats_cb, "statistics.interval.ms": STATS_INTERVAL_MS}
        return conf

    def error_cb(self, err: KafkaError) -> None:
        self.last_error = err.str()
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.reachable = False
        if err.code() in _AUTH_ERRORS and self.failure is None:
            # librdkafka's text names the mechanism and broker, never the password.
            self.failure = f"Kafka authentication failed: {err.str()}"
            raise ConfigurationError(self.failure)
        log.debug("kafka client error %s: %s", err.name(), err.str())

    def check(self) -> None:
        """Raise the recorded authentication failure, if any."""
        if self.failure is not None:
            raise ConfigurationError(self.failure)

    def stats_cb(self, stats_json: str) -> None:
        stats = json.loads(stats_json)
        brokers = stats.get("brokers", {}).values()
        self.reachable = any(b.get("nodeid", -1) >= 0 and b.get("state") == "UP" for b in brokers)
        if self.metrics is None or self.topic is None:
            return
        for key, part in stats.get("topics", {}).get(self.topic, {}).get("partitions", {}).items():
            if int(key) < 0 or not part.get("desired"):  # -1: librdkafka's unassigned-messages queue
                continue
            self.metrics.set_lag(int(key), _lag(part, self.commits.get(int(key))))


def _lag(part: dict[str, Any], committed: int | None) -> int:
    """Messages between the committed offset and the end (last stable offset under ``read_committed``) of one
    partition in librdkafka statistics; negative = unknown (no series)."""
    end = int(part.get("ls_offset", -1))
    end = end if end >= 0 else int(part.get("hi_offset", -1))
    if end >= 0 and committed is not None:
        return max(end - committed, 0)
    lag = int(part.get("consumer_lag", -1))  # from the offset committed as of assignment; -1 before any commit
    if lag < 0 and end >= 0 and part.get("app_offset", -1) >= 0:
        lag = end - int(part["app_offset"])  # before a first commit: from the position instead
    return 0 if lag < 0 and end == 0 else lag  # an empty partition is never behind


class Readiness:
    """Ready = the group assigned this member its partitions (possibly none), each one's state is restored,
    and a broker is reachable.  Updates ``metrics``' restore progress on every change."""

    def __init__(self, broker: BrokerWatch | None = None, metrics: Metrics | None = None) -> None:
        self.broker, self.metrics = broker, metrics
        self.joined = False
        self._pending: set[Hashable] = set()
        self._restored: set[Hashable] = set()
        self._lock = threading.Lock()

    def assigned(self, partitions: Iterable[Hashable], *, restored: bool = False) -> None:
        with self._lock:
            self.joined = True
            for p in partitions:
                (self._restored if restored else self._pending).add(p)
                (self._pending if restored else self._restored).discard(p)
        self._report()

    def restored(self, partition: Hashable) -> None:
        with self._lock:
            if partition in self._pending:
                self._pending.discard(partition)
                self._restored.add(partition)
        self._report()

    def revoked(self, partitions: Iterable[Hashable]) -> None:
        with self._lock:
            for p in partitions:
                self._pending.discard(p)
                self._restored.discard(p)
        self._report()

    @property
    def progress(self) -> float:
        """Fraction of assigned partitions restored; 1.0 when none is assigned."""
        with self._lock:
            total = len(self._pending) + len(self._restored)
            return 1.0 if total == 0 else len(self._restored) / total

    def __call__(self) -> tuple[bool, str]:
        if not self.joined:
            return False, "no partition assignment yet"
        with self._lock:
            pending = sorted(map(str, self._pending))
        if pending:
            return False, f"restoring state of {len(pending)} partition(s): {', '.join(pending[:8])}"
        if self.broker is not None and not self.broker.reachable:
            return False, f"broker not reachable ({self.broker.last_error or 'no broker up'})"
        return True, "ready"

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_restore_progress(self.progress)


def preflight(settings: Settings, timeout_s: float = 20.0) -> bool:
    """Connect, authenticate and fetch cluster metadata once with ``settings``' client properties.

    Raises :class:`ConfigurationError` ("Kafka authentication failed: ...") on the first authentication
    failure, typically within a second or two.  Returns True once a broker answered, False (after a warning)
    when none did within ``timeout_s``: then the caller's own timeouts and retries apply as before.
    """
    from confluent_kafka.admin import AdminClient

    watch = BrokerWatch()
    # librdkafka's own log lines go through Python logging: structured and redacted like the rest.
    admin = AdminClient(settings.kafka_client_config() | watch.callbacks(stats=False) |
                        {"logger": logging.getLogger("liquidstream.kafka")})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=max(0.1, min(1.0, deadline - time.monotonic())))  # 1 s slices
            return True
        except KafkaException as ex:
            admin.poll(0)  # serves error_cb: raises here on an authentication failure
            watch.check()
            if time.monotonic() >= deadline:
                log.warning("no Kafka broker at %s answered within %.0f s: %s", settings.bootstrap, timeout_s,
                            ex.args[0].str() if ex.args else ex)
                return False
