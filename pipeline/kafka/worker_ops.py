"""The operations side of one ``liquidstream run`` worker: its metrics, liveness, readiness, broker watch and
the HTTP endpoint serving them (``/metrics``, ``/healthz``, ``/readyz`` on ``metrics_port``).

:class:`WorkerOps` is what :class:`~liquidstream.pipeline.kafka.worker.KafkaWorker` talks to: a few verbs called from
the loop (:meth:`~WorkerOps.beat` every turn, :meth:`~WorkerOps.batch_done` once per committed batch) and from the
rebalance callbacks (:meth:`~WorkerOps.assigning`, :meth:`~WorkerOps.restored`, :meth:`~WorkerOps.released`). The
clients get the :class:`~liquidstream.pipeline.ops.health.BrokerWatch` callbacks (:meth:`~WorkerOps.client_config`), so
an authentication failure stops the worker, librdkafka statistics feed the per-partition lag, and a broker outage makes
``/readyz`` 503.  ``/readyz`` is 200 only when the group assigned this member its partitions, each one's state is
restored (and :attr:`KafkaWorker.ready <liquidstream.pipeline.kafka.worker.KafkaWorker.ready>` agrees) and a broker is
reachable.

>>> from liquidstream.pipeline.settings import Settings
>>> ops = WorkerOps(Settings(input_topic="in"))
>>> ops.check()
(False, 'no partition assignment yet')
>>> ops.assigning([("in", 0)]); ops.check()
(False, 'restoring state of 1 partition(s): in[0]')
>>> ops.restored([("in", 0)], devices=0); ops.check(), ops.metrics.value("liquidstream_restore_progress")
((True, 'ready'), 1.0)
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from ipaddress import ip_address
from typing import Any

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.kafka.output import BatchOutput
from liquidstream.pipeline.ops.health import BrokerWatch, Health, Readiness
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.ops.server import DeviceQuery, OpsServer
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.types import TopicPart

__all__ = ["MAX_SILENCE_S", "WorkerOps"]
log = logging.getLogger("liquidstream.worker")
#: Seconds without a loop turn after which ``/healthz`` reports the worker stalled.
MAX_SILENCE_S = 60.0


def _loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine only.

    >>> _loopback("127.0.0.1"), _loopback("::1"), _loopback("localhost"), _loopback("0.0.0.0"), _loopback("pod-7")
    (True, True, True, False, False)
    """
    try:
        return ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def _name(tp: TopicPart) -> str:
    return f"{tp[0]}[{tp[1]}]"


class WorkerOps:
    """Metrics, health, readiness and broker watch of one worker; the HTTP server only once :meth:`start`-ed."""

    def __init__(self, settings: Settings, *, max_silence_s: float = MAX_SILENCE_S) -> None:
        self.metrics, self.health = Metrics(), Health(max_silence_s=max_silence_s)
        self.topic, self.host, self._token = settings.input_topic, settings.metrics_host, settings.query_token
        self.watch = BrokerWatch(self.metrics, topic=self.topic)
        self.readiness = Readiness(self.watch, self.metrics)
        self.server: OpsServer | None = None
        self.port: int | None = None
        self._worker_ready: Callable[[], bool] = lambda: True
        self._kafka_log = logging.getLogger("liquidstream.kafka")

    # ------------------------------------------------------------------------------------------ set-up
    def client_config(self, conf: dict[str, Any], *, stats: bool) -> dict[str, Any]:
        """``conf`` plus the broker watch's callbacks (statistics only where asked: the consumer) and the
        logger that routes librdkafka's own lines through the process's (redacting) handler."""
        return conf | self.watch.callbacks(stats=stats) | {"logger": self._kafka_log}

    def start(self, port: int, *, worker_ready: Callable[[], bool] | None = None,
              queries: DeviceQuery | None = None) -> int:
        """Serve the three paths (and ``/devices/{id}`` with ``queries``) on ``port`` (0 = an ephemeral one) of
        ``metrics_host`` and return the bound port.

        A port already in use (a second worker on one host) falls back to an ephemeral port with a warning
        naming it, rather than running without probes or refusing to start.
        """
        if worker_ready is not None:
            self._worker_ready = worker_ready
        if self.server is None:
            self.server = OpsServer(self.metrics, self.health, self.check, host=self.host, queries=queries,
                                    token=self._token)
            if queries is not None and self._token is None and not _loopback(self.host):
                log.warning("/devices/{id} serves sensor data on %s without a token: set LIQUIDSTREAM_QUERY_TOKEN, "
                            "or LIQUIDSTREAM_METRICS_HOST=127.0.0.1, or LIQUIDSTREAM_DEVICE_QUERIES=false", self.host)
        try:
            try:
                self.port = self.server.start(port)
            except OSError as ex:
                if ex.errno != errno.EADDRINUSE or port == 0:
                    raise
                self.port = self.server.start(0)
                log.warning("metrics port %d is in use: serving /metrics, /healthz, /readyz on port %d instead",
                            port, self.port)
        except OSError as ex:
            msg = f"cannot serve /metrics, /healthz, /readyz on port {port}: {ex.strerror or ex}"
            raise ConfigurationError(msg) from ex
        return self.port

    def set_model_version(self, version: str) -> None:
        self.metrics.set_model_version(version)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ------------------------------------------------------------------------------------------ readiness
    def check(self) -> tuple[bool, str]:
        """What ``/readyz`` answers (called from the HTTP thread)."""
        ready, reason = self.readiness()
        if ready and not self._worker_ready():
            return False, "worker not ready (joining the group or restoring state)"
        return ready, reason

    def assigning(self, tps: Iterable[TopicPart]) -> None:
        """Partitions assigned, their state not restored yet (``/readyz`` 503, restore progress < 1)."""
        self.health.beat()  # a restore may take a while: it starts from a fresh beat
        self.readiness.assigned([_name(tp) for tp in tps])

    def restored(self, tps: Iterable[TopicPart], devices: int) -> None:
        for tp in tps:
            self.readiness.restored(_name(tp))
        self.metrics.set_devices(devices)
        self.health.beat()

    def released(self, tps: Iterable[TopicPart], devices: int) -> None:
        """Partitions revoked or lost: no readiness wait for them, no lag series, fewer devices."""
        gone = list(tps)
        self.readiness.revoked([_name(tp) for tp in gone])
        self.metrics.forget_partitions(p for _, p in gone)
        self.watch.forget(p for t, p in gone if t == self.topic)
        self.metrics.set_devices(devices)

    # ------------------------------------------------------------------------------------------ loop
    def beat(self) -> None:
        self.health.beat()

    def batch_done(self, out: BatchOutput, seconds: float, devices: int) -> None:
        """One committed batch: counters, batch time, end-to-end latency of its predictions (one numpy pass)."""
        self.metrics.observe_batch(events=out.consumed, predictions=out.predictions, alerts=out.alerts,
                                   dead_letters_by_reason=out.dead_letters, late=out.late, batch_seconds=seconds,
                                   event_ts_ms=out.event_ts_ms, publish_ms=time.time_ns() // 1_000_000)
        self.metrics.set_devices(devices)
        self.watch.committed({p: o for (t, p), o in out.commits.items() if t == self.topic})
