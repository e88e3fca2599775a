"""Metrics, health and readiness: scraped over real HTTP from an ephemeral port, as Prometheus and the
kubelet would."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.ops.health import BrokerWatch, Health, Readiness, preflight
from liquidstream.pipeline.ops.metrics import LATENCY_BUCKETS_S, Metrics
from liquidstream.pipeline.ops.server import OpsServer
from liquidstream.pipeline.settings import Settings

EXPECTED_FAMILIES = {
    "liquidstream_events_processed": "counter", "liquidstream_predictions": "counter",
    "liquidstream_alerts": "counter", "liquidstream_dead_letters": "counter",
    "liquidstream_late_events": "counter", "liquidstream_batch_seconds": "histogram",
    "liquidstream_end_to_end_latency_seconds": "histogram", "liquidstream_consumer_lag": "gauge",
    "liquidstream_devices": "gauge", "liquidstream_model_version": "gauge",
    "liquidstream_restore_progress": "gauge", "liquidstream_model_updates": "counter",
    "liquidstream_trainer_candidates": "counter", "liquidstream_trainer_buffer_windows": "gauge",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as ex:
        return ex.code, ex.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def ops() -> Iterator[tuple[OpsServer, Metrics, FakeClock, dict[str, Any]]]:
    clock, state = FakeClock(), {"ready": (False, "warming up")}
    metrics = Metrics()
    server = OpsServer(metrics, Health(max_silence_s=30.0, clock=clock), lambda: state["ready"], host="127.0.0.1")
    yield server, metrics, clock, state
    server.stop()


def batch(m: Metrics, **kw: Any) -> None:
    args: dict[str, Any] = {"events": 10, "predictions": 8, "alerts": 1, "dead_letters_by_reason": {"schema": 2},
                            "late": 0, "batch_seconds": 0.03}
    m.observe_batch(**(args | kw))


def test_metrics_endpoint_serves_counters_that_move(ops: Any) -> None:
    server, metrics, _, _ = ops
    port = server.start(0)
    assert port > 0 and server.start(0) == port  # idempotent
    status, text = get(port, "/metrics")
    assert status == 200
    # The text parser reports counters' and histograms' `_created` timestamps as gauges of their own.
    families = {f.name: f.type for f in text_string_to_metric_families(text) if not f.name.endswith("_created")}
    assert families == EXPECTED_FAMILIES
    before = samples(text)
    assert before[("liquidstream_predictions_total", ())] == 0.0
    batch(metrics, event_ts_ms=np.array([1_000, 1_900]), publish_ms=2_000)
    batch(metrics, dead_letters_by_reason={"late": 1, "no-such-reason": 3}, late=1)
    metrics.set_lag(3, 42)
    metrics.set_devices(7)
    metrics.set_model_version("abc123")
    metrics.set_restore_progress(0.5)
    after = samples(get(port, "/metrics")[1])
    assert after[("liquidstream_events_processed_total", ())] == 20.0
    assert after[("liquidstream_predictions_total", ())] == 16.0
    assert after[("liquidstream_alerts_total", ())] == 2.0
    assert after[("liquidstream_late_events_total", ())] == 1.0
    assert after[("liquidstream_dead_letters_total", (("reason", "schema"),))] == 2.0
    assert after[("liquidstream_dead_letters_total", (("reason", "late"),))] == 1.0
    assert after[("liquidstream_dead_letters_total", (("reason", "other"),))] == 3.0  # bounded label values
    assert after[("liquidstream_batch_seconds_count", ())] == 2.0
    assert after[("liquidstream_end_to_end_latency_seconds_count", ())] == 2.0
    assert after[("liquidstream_end_to_end_latency_seconds_sum", ())] == pytest.approx(1.1)
    for le, count in (("0.05", 0.0), ("0.1", 1.0), ("0.5", 1.0), ("1.0", 2.0), ("+Inf", 2.0)):  # 0.1 s and 1 s
        assert after[("liquidstream_end_to_end_latency_seconds_bucket", (("le", le),))] == count, le
    assert after[("liquidstream_consumer_lag", (("partition", "3"),))] == 42.0
    assert after[("liquidstream_devices", ())] == 7.0
    assert after[("liquidstream_model_version", (("version", "abc123"),))] == 1.0
    assert after[("liquidstream_restore_progress", ())] == 0.5


def test_bulk_latency_histogram_matches_prometheus_histogram() -> None:
    rng = np.random.default_rng(0)
    latency_s = np.concatenate([rng.exponential(2.0, 500), LATENCY_BUCKETS_S, [0.0, 1e6]])
    publish_ms = 10_000_000
    m = Metrics()
    m.observe_batch(events=0, predictions=0, alerts=0, dead_letters_by_reason={}, late=0, batch_seconds=0.0,
                    event_ts_ms=publish_ms - latency_s * 1000.0, publish_ms=publish_ms)
    reference = Histogram("ref", "reference", buckets=LATENCY_BUCKETS_S, registry=CollectorRegistry())
    for v in (publish_ms - (publish_ms - latency_s * 1000.0)) / 1000.0:  # the same float rounding
        reference.observe(float(v))
    (family,) = reference.collect()
    ref = {s.labels["le"]: s.value for s in family.samples if s.name == "ref_bucket"}
    for le, count in ref.items():
        assert m.value("liquidstream_end_to_end_latency_seconds_bucket", le=le) == count, le


def test_each_metrics_object_owns_its_registry_and_versions_replace_each_other() -> None:
    a, b = Metrics(), Metrics()
    batch(a)
    assert a.value("liquidstream_events_processed_total") == 10.0
    assert b.value("liquidstream_events_processed_total") == 0.0
    a.set_model_version("v1")
    a.set_model_version("v2")
    assert a.value("liquidstream_model_version", version="v1") is None
    assert a.value("liquidstream_model_version", version="v2") == 1.0
    a.set_lag(1, 5)
    a.set_lag(2, -1)  # unknown lag: no series rather than a misleading value
    a.forget_partitions([1, 2])
    assert a.value("liquidstream_consumer_lag", partition="1") is None
    assert a.value("liquidstream_consumer_lag", partition="2") is None
    a.set_restore_progress(3.0)
    assert a.value("liquidstream_restore_progress") == 1.0
    assert "liquidstream_dead_letters_total" in a.series_names()


def test_healthz_follows_the_loop_heartbeat(ops: Any) -> None:
    server, _, clock, _ = ops
    port = server.start(0)
    status, body = get(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    clock.now += 31.0  # the loop did not turn for longer than max_silence_s
    status, body = get(port, "/healthz")
    assert status == 503 and json.loads(body) == {"status": "stalled", "last_beat_s_ago": 31.0, "max_silence_s": 30.0}
    server.health.beat()
    assert get(port, "/healthz")[0] == 200


def test_readyz_reports_the_reason(ops: Any) -> None:
    server, _, _, state = ops
    port = server.start(0)
    status, body = get(port, "/readyz")
    assert status == 503 and json.loads(body) == {"status": "not ready", "reason": "warming up"}
    state["ready"] = True
    assert get(port, "/readyz") == (200, json.dumps({"status": "ready", "reason": "ready"}) + "\n")
    server._ready = lambda: 1 / 0  # the check itself fails: not ready, never a crashed probe
    status, body = get(port, "/readyz")
    assert status == 503 and "ZeroDivisionError" in json.loads(body)["reason"]
    assert get(port, "/nope")[0] == 404


def test_readiness_tracks_assignment_restore_and_broker() -> None:
    metrics, watch = Metrics(), BrokerWatch()
    ready = Readiness(watch, metrics)
    assert ready() == (False, "no partition assignment yet")
    ready.assigned([("readings", 0), ("readings", 1)])
    ok, reason = ready()
    assert not ok and reason.startswith("restoring state of 2 partition(s)")
    assert metrics.value("liquidstream_restore_progress") == 0.0
    ready.restored(("readings", 0))
    assert ready.progress == 0.5 and metrics.value("liquidstream_restore_progress") == 0.5
    ready.revoked([("readings", 1)])
    assert ready() == (True, "ready")
    watch.error_cb(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert ready() == (False, "broker not reachable (1/1 brokers are down)")
    watch.stats_cb(json.dumps({"brokers": {"b/1": {"nodeid": 1, "state": "UP"}}}))
    assert ready() == (True, "ready")
    ready.revoked([("readings", 0)])
    assert ready() == (True, "ready") and ready.progress == 1.0  # a member with no partitions is ready


def test_broker_watch_fails_fast_on_authentication_and_tracks_lag() -> None:
    metrics = Metrics()
    watch = BrokerWatch(metrics, topic="readings")
    conf = Settings(bootstrap="127.0.0.1:1").kafka_client_config() | watch.callbacks()
    assert conf["error_cb"] == watch.error_cb and conf["statistics.interval.ms"] > 0
    watch.error_cb(KafkaError(KafkaError._TRANSPORT, "broker disconnected"))  # benign: logged only
    watch.error_cb(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert not watch.reachable
    watch.stats_cb(json.dumps({"brokers": {"bootstrap": {"nodeid": -1, "state": "UP"}}}))
    assert not watch.reachable  # the bootstrap placeholder is not a broker
    auth = KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: invalid credentials")
    with pytest.raises(ConfigurationError, match="Kafka authentication failed: SASL authentication error"):
        watch.error_cb(auth)
    watch.error_cb(auth)  # recorded, not raised again (a close() must not raise)
    with pytest.raises(ConfigurationError, match="authentication"):
        watch.check()
    stats = {"brokers": {"bootstrap": {"nodeid": -1, "state": "UP"}, "b/1": {"nodeid": 1, "state": "UP"}},
             "topics": {"readings": {"partitions": {
                 "0": {"desired": True, "consumer_lag": 7},
                 "1": {"desired": True, "consumer_lag": -1, "hi_offset": 50, "app_offset": 20},
                 "2": {"desired": False, "consumer_lag": 9},
                 # exactly-once: the transaction commits, librdkafka's consumer_lag still counts from the offset
                 # fetched at assignment (10); the application's last commit (100) against the end is the lag.
                 "3": {"desired": True, "consumer_lag": 94, "committed_offset": 10, "app_offset": 104,
                       "hi_offset": 106, "ls_offset": 104},
                 "4": {"desired": True, "consumer_lag": -1, "app_offset": -1001, "hi_offset": 0},  # empty
                 "-1": {"desired": False, "consumer_lag": -1}}}}}
    watch.committed({3: 100})
    watch.stats_cb(json.dumps(stats))
    assert watch.reachable
    assert metrics.value("liquidstream_consumer_lag", partition="0") == 7.0
    assert metrics.value("liquidstream_consumer_lag", partition="1") == 30.0
    assert metrics.value("liquidstream_consumer_lag", partition="2") is None
    assert metrics.value("liquidstream_consumer_lag", partition="3") == 4.0
    assert metrics.value("liquidstream_consumer_lag", partition="4") == 0.0
    watch.forget([3])
    watch.stats_cb(json.dumps(stats))
    assert metrics.value("liquidstream_consumer_lag", partition="3") == 94.0  # librdkafka's again


def test_stop_releases_the_port() -> None:
    server = OpsServer(Metrics(), Health(), host="127.0.0.1")
    port = server.start(0)
    assert get(port, "/readyz")[0] == 200  # no check given: ready
    server.stop()
    server.stop()  # idempotent
    again = OpsServer(Metrics(), Health(), host="127.0.0.1")
    try:
        assert again.start(port) == port
    finally:
        again.stop()


def test_preflight_gives_up_quietly_when_no_broker_answers(caplog: pytest.LogCaptureFixture) -> None:
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: connection refused, not an authentication error
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="liquidstream.health"):
        assert preflight(Settings(bootstrap=f"127.0.0.1:{port}"), timeout_s=1.5) is False
    assert 1.4 <= time.monotonic() - start < 10
    assert "no Kafka broker at 127.0.0.1" in caplog.text
