"""The HTTP endpoint of a worker process: metrics, liveness and readiness on one port (``metrics_port``, 9108).

:class:`OpsServer` serves ``GET /metrics`` (Prometheus text from :class:`~liquidstream.pipeline.ops.metrics.Metrics`),
``/healthz`` (200 while :class:`~liquidstream.pipeline.ops.health.Health` beats, else 503) and ``/readyz`` (200 when the
``ready`` check passes, else 503 with a JSON ``reason``), from a daemon thread so that a slow scrape never
stalls the worker loop.  Given a ``queries`` callable it also answers ``GET /devices/{id}[?at=EPOCH_MS]`` (a
device's forecast at that instant: :mod:`liquidstream.pipeline.kafka.device_query`); that path serves sensor data,
so with a ``token`` it answers only requests carrying ``Authorization: Bearer <token>`` (401 otherwise), while
``/metrics`` and the probes never ask for one.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr

from liquidstream.pipeline.ops.health import Health, ReadyCheck
from liquidstream.pipeline.ops.metrics import Metrics

__all__ = ["DEVICES", "DeviceQuery", "OpsServer"]
log = logging.getLogger("liquidstream.metrics")
#: Path prefix of the device queries: ``/devices/{url-encoded device id}``.
DEVICES = "/devices/"
#: ``(device id, instant epoch ms or None for now) -> (HTTP status, JSON document)``.
DeviceQuery = Callable[[str, int | None], tuple[int, dict[str, Any]]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # the name http.server dispatches GET requests to
        ops = self.server.ops
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, ops.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok, silence = ops.health.alive(), round(ops.health.silence_s(), 3)
            self._json(200 if ok else 503, {"status": "ok" if ok else "stalled", "last_beat_s_ago": silence,
                                            "max_silence_s": ops.health.max_silence_s})
        elif path == "/readyz":
            ready, reason = ops.readiness()
            self._json(200 if ready else 503, {"status": "ready" if ready else "not ready", "reason": reason})
        elif path.startswith(DEVICES):
            try:
                device_id = unquote(path[len(DEVICES):], errors="strict")
            except UnicodeDecodeError:
                self._json(400, {"status": "bad request", "reason": "the device id is not URL-encoded UTF-8"})
                return
            self._device(device_id, self.path.partition("?")[2])
        else:
            self._json(404, {"status": "not found", "paths": ["/metrics", "/healthz", "/readyz", "/devices/{id}"]})

    def _device(self, device_id: str, query: str) -> None:
        ops = self.server.ops
        if ops.queries is None:
            self._json(404, {"status": "not found", "reason": "device queries are off (LIQUIDSTREAM_DEVICE_QUERIES)"})
            return
        if ops.token is not None and not self._authorised(ops.token):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="liquidstream devices"')
            body = b'{"status": "unauthorized", "reason": "this path needs Authorization: Bearer <query token>"}\n'
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        at = parse_qs(query).get("at", [None])[-1]
        if not device_id or (at is not None and not (at.isascii() and at.isdigit())):
            reason = f"at must be epoch ms (digits), got {(at or '')[:40]!r}" if device_id else "no device id"
            self._json(400, {"status": "bad request", "reason": reason})
            return
        code, doc = ops.queries(device_id, None if at is None else int(at))
        self._json(code, doc)

    def _authorised(self, token: bytes) -> bool:
        given = (self.headers.get("Authorization") or "").encode("utf-8", "replace")
        return hmac.compare_digest(given, b"Bearer " + token)  # constant time: the token is not guessable by timing

    def _json(self, code: int, doc: dict[str, Any]) -> None:
        self._send(code, json.dumps(doc).encode() + b"\n", "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the base class signature (shadows format)
        log.debug("%s " + format, self.address_string(), *args)  # probes every few s: not INFO noise


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung scrape never blocks process exit
    ops: OpsServer


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` in a daemon thread.  ``host`` defaults to every interface:
    in a pod the kubelet probes the pod IP and Prometheus scrapes it."""

    def __init__(self, metrics: Metrics, health: Health, ready: ReadyCheck | None = None,
                 host: str = "0.0.0.0",  # noqa: S104 - probes and scrapes come from outside the pod
                 queries: DeviceQuery | None = None, token: SecretStr | None = None) -> None:
        self.metrics, self.health, self.host, self.queries = metrics, health, host, queries
        self.token = None if token is None else token.get_secret_value().encode()
        self._ready: ReadyCheck = ready if ready is not None else (lambda: True)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def readiness(self) -> tuple[bool, str]:
        try:
            result = self._ready()
        except Exception as ex:  # a failing check means "not ready", never a crashed probe
            return False, f"readiness check failed: {type(ex).__name__}"
        return result if isinstance(result, tuple) else (bool(result), "ready" if result else "not ready")

    def start(self, port: int) -> int:
        """Bind ``port`` (0 = an ephemeral one) and serve; returns the bound port."""
        if self._server is not None:
            return int(self._server.server_address[1])
        self._server = _Server((self.host, port), _Handler)
        self._server.ops = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="liquidstream-ops-http", daemon=True)
        self._thread.start()
        bound = int(self._server.server_address[1])
        log.info("serving /metrics, /healthz, /readyz on %s:%d", self.host, bound, extra={"metrics_port": bound})
        if self.queries is not None:
            log.info("answering /devices/{id} on %s:%d (%s)", self.host, bound,
                     "token required" if self.token is not None else "no token asked")
        return bound

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None and thread is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5.0)
