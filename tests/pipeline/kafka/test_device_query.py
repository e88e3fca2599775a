"""``GET /devices/{id}`` over real HTTP: the answer is the operator's ``forecast_at``, handed from the HTTP thread
to a loop thread; unknown devices name their partition and owner; ``at`` before the last reading is 400; with a
query token, only requests that carry it are answered (``/metrics`` and the probes are not affected); the token
never reaches the logs."""

from __future__ import annotations

import io
import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import SecretStr

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.pipeline.kafka.device_query import DeviceQueries, Held
from liquidstream.pipeline.ops.health import Health
from liquidstream.pipeline.ops.logs import setup_logging
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.ops.server import OpsServer
from liquidstream.pipeline.settings import Settings

T0 = 1_767_225_600_000  # epoch ms
NOW_S = T0 / 1000 + 3600.0  # the desk's wall clock: an hour after the first reading, seconds
TOKEN = "q-token-7f3a9c"  # noqa: S105 - a test value
PARTITIONS = 4


def make_op() -> LiquidOperator:
    torch.manual_seed(0)
    op = LiquidOperator(Forecaster(n_channels=2, hidden_size=8), OperatorSettings())
    ts = T0 + np.cumsum(np.random.default_rng(0).integers(300, 3000, (20,)))
    values = np.random.default_rng(1).standard_normal((20, 2)).astype(np.float32)
    op.process(["pump/7 ü"] * 20, ts, values)
    return op


def held_ids() -> tuple[str, str]:
    """A device id on partition 0 (held here) and one on another partition, by librdkafka's CRC-32."""
    on = next(f"d{i}" for i in range(100) if zlib.crc32(f"d{i}".encode()) % PARTITIONS == 0)
    off = next(f"d{i}" for i in range(100) if zlib.crc32(f"d{i}".encode()) % PARTITIONS != 0)
    return on, off


class Served:
    """An OpsServer whose device queries are answered by a loop thread, as the worker loop does."""

    def __init__(self, token: str | None = None, loop: bool = True, timeout_s: float = 5.0) -> None:
        self.op = make_op()
        self.desk = DeviceQueries(Settings(), "w-1", timeout_s=timeout_s, clock=lambda: NOW_S)
        self.held = Held("readings", frozenset({0}), PARTITIONS, lambda d: 0)
        self.server = OpsServer(Metrics(), Health(), host="127.0.0.1", queries=self.desk.ask,
                                token=None if token is None else SecretStr(token))
        self.port = self.server.start(0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        if loop:
            self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.005):
            self.desk.serve(self.op, self.held)

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - a local test server
                code, body = resp.status, resp.read().decode()
        except urllib.error.HTTPError as ex:
            code, body = ex.code, ex.read().decode()
        return code, json.loads(body) if body.startswith("{") else body

    def close(self) -> None:
        self.stop.set()
        self.server.stop()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.close()


def path_of(device_id: str) -> str:
    return "/devices/" + urllib.parse.quote(device_id, safe="")


def test_a_device_query_answers_the_operators_forecast_at_that_instant(served: Served) -> None:
    device = "pump/7 ü"  # a slash and a non-ASCII letter, URL-encoded
    last = int(served.op.store.host["last_ts_ms"][served.op.store.lookup([device])[0]])
    before = served.op.store.snapshot()
    code, doc = served.get(path_of(device) + f"?at={last + 2500}")
    assert code == 200, doc
    want = served.op.forecast_at([device], [last + 2500])
    assert doc["at"] == last + 2500 and doc["last_reading_ts"] == last and doc["gap_s"] == 2.5
    np.testing.assert_allclose(doc["forecast"], want.forecast[0], rtol=1e-6)
    np.testing.assert_allclose(doc["forecast_std"], want.forecast_std[0], rtol=1e-6)
    np.testing.assert_allclose(doc["normal_level"], want.normal_level[0], rtol=1e-6)
    assert doc["alert"] == {"open": False} and doc["readings"] == 20 and doc["model_version"] == "untrained"
    assert doc["partition"] == 0 and doc["worker"] == "w-1" and not doc["long_gap"]
    assert served.op.store.snapshot() == before  # the query changed no state
    code, now = served.get(path_of(device))  # no at: now (the desk's clock), an hour after the first reading
    assert code == 200 and now["at"] == int(NOW_S * 1000) and now["long_gap"]  # > max_gap_s (600 s) of silence


def test_unknown_devices_name_their_partition_and_owner(served: Served) -> None:
    on, off = held_ids()
    code, doc = served.get(path_of(off))
    p = zlib.crc32(off.encode()) % PARTITIONS
    assert code == 404
    assert doc["reason"] == (f"device {off!r} belongs to partition readings[{p}] (consistent_random partitioner), "
                             "owned by another worker")
    code, doc = served.get(path_of(on))
    assert code == 404 and doc["reason"] == (f"device {on!r} has no reading on this worker, which holds its "
                                             "partition readings[0] (consistent_random partitioner)")


@pytest.mark.parametrize(("query", "fragment"), [
    ("?at=1000", "is before its last reading"),
    ("?at=12.5", "at must be epoch ms"),
    ("?at=-3", "at must be epoch ms"),
])
def test_bad_instants_are_400_with_one_line(served: Served, query: str, fragment: str) -> None:
    code, doc = served.get(path_of("pump/7 ü") + query)
    assert code == 400 and fragment in doc["reason"] and "\n" not in doc["reason"]


def test_with_a_token_only_requests_that_carry_it_are_answered() -> None:
    s = Served(token=TOKEN)
    try:
        path = path_of("pump/7 ü")
        assert s.get(path)[0] == 401
        assert s.get(path, TOKEN[:-1])[0] == 401  # a wrong token
        code, doc = s.get(path, token=TOKEN)
        assert code == 200 and doc["device_id"] == "pump/7 ü"
        assert s.get("/metrics")[0] == 200 and s.get("/healthz")[0] == 200  # probes and scrapes as before
    finally:
        s.close()


def test_queries_off_and_a_loop_that_does_not_answer() -> None:
    server = OpsServer(Metrics(), Health(), host="127.0.0.1")
    port = server.start(0)
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/devices/a", timeout=5)  # noqa: S310
        assert info.value.code == 404 and b"device queries are off" in info.value.read()
    finally:
        server.stop()
    stuck = Served(loop=False, timeout_s=0.2)  # a loop busy in a long batch or a restore
    try:
        code, doc = stuck.get(path_of("pump/7 ü"))
        assert code == 503 and "did not answer within 0.2 s" in doc["reason"]
        assert stuck.desk.waiting()  # the loop answers it on its next turn (the caller has gone)
        assert stuck.desk.serve(stuck.op, stuck.held) == 1 and not stuck.desk.waiting()
    finally:
        stuck.close()


def test_the_query_token_never_reaches_the_logs() -> None:
    settings = Settings(query_token=SecretStr(TOKEN), log_format="json")
    out = io.StringIO()
    setup_logging(settings, stream=out)
    log = logging.getLogger("liquidstream.worker")
    log.info("settings %r", settings)
    log.info("header was Bearer %s", TOKEN)
    log.info("query token %s", settings.query_token)
    assert TOKEN not in out.getvalue() and out.getvalue().count("***") >= 2
