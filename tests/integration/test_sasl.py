"""SASL/SCRAM-SHA-512 against a real broker: ``kafka-local start --sasl-scram`` on free ports, this module's own.

Valid credentials produce and consume end to end; a wrong password is an authentication error that
:class:`~liquidstream.pipeline.ops.health.BrokerWatch` turns into a prompt, clear failure, and that the CLI must report
within seconds without ever printing the password: ``simulate`` and ``run`` call
:func:`~liquidstream.pipeline.ops.health.preflight` before any long-lived client exists.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.ops.health import BrokerWatch, preflight
from liquidstream.pipeline.settings import Settings
from tests.conftest import KAFKA_LOCAL, NATIVE_START_TIMEOUT_S, NATIVE_STOP_TIMEOUT_S

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
USER = "ls-test"
PASSWORD = f"right-{uuid.uuid4().hex[:12]}"
WRONG = f"wrong-{uuid.uuid4().hex[:12]}"
FAIL_FAST_S = 30.0  # a wrong password must end the command within this many seconds


@dataclass(frozen=True)
class SaslBroker:
    bootstrap: str
    user: str
    password: str

    def client(self, password: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": self.user,
                "sasl.password": self.password if password is None else password, **extra}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _kafka_local(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(KAFKA_LOCAL), *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SaslBroker]:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("the native SASL broker needs Java 17+ (and Maven for the first jar fetch)")
    data_dir = tmp_path_factory.mktemp("kafka-sasl")
    port, controller, internal = _free_ports(3)
    try:
        result = _kafka_local("start", "--sasl-scram", "--user", USER, "--password", PASSWORD, "--port", str(port),
                              "--controller-port", str(controller), "--internal-port", str(internal),
                              "--data-dir", str(data_dir), timeout_s=NATIVE_START_TIMEOUT_S)
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines or lines[-1] != f"bootstrap=127.0.0.1:{port}":
            pytest.fail(f"kafka-local start --sasl-scram failed ({result.returncode}):\n{result.stdout}\n"
                        f"{result.stderr}", pytrace=False)
        assert lines[:-1] == ["security.protocol=SASL_PLAINTEXT", "sasl.mechanism=SCRAM-SHA-512",
                              f"sasl.username={USER}"]
        assert PASSWORD not in result.stdout + result.stderr
        assert PASSWORD not in (data_dir / "state.json").read_text() + (data_dir / "server.properties").read_text()
        yield SaslBroker(lines[-1].removeprefix("bootstrap="), USER, PASSWORD)
    finally:
        _kafka_local("stop", "--data-dir", str(data_dir), timeout_s=NATIVE_STOP_TIMEOUT_S)
        assert _kafka_local("status", "--data-dir", str(data_dir), timeout_s=30).returncode == 3


def test_valid_scram_credentials_produce_and_consume(sasl_broker: SaslBroker) -> None:
    from confluent_kafka import Consumer, Producer

    topic = f"sasl-{uuid.uuid4().hex[:8]}"  # auto-created by the broker on first produce
    watch = BrokerWatch()
    producer = Producer(sasl_broker.client(**watch.callbacks(stats=False)))
    for i in range(20):
        producer.produce(topic, f"v{i}".encode(), f"k{i % 4}".encode())
    assert producer.flush(30) == 0 and watch.failure is None
    producer.close()
    consumer = Consumer(sasl_broker.client(**{"group.id": f"g-{topic}", "auto.offset.reset": "earliest"}))
    got: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(got) < 20 and time.monotonic() < deadline:
            for m in consumer.consume(100, 0.5):
                assert m.error() is None, m.error()
                got.append(m.value() or b"")
    finally:
        consumer.close()
    assert sorted(got) == sorted(f"v{i}".encode() for i in range(20))


def test_broker_watch_turns_a_wrong_password_into_a_prompt_error(sasl_broker: SaslBroker) -> None:
    """The mechanism the CLI fix relies on: error_cb raises, a short flush() surfaces it."""
    from confluent_kafka import Producer

    watch = BrokerWatch()
    # log_level 0: librdkafka's own lines about the refused login would only repeat the error.
    producer = Producer(sasl_broker.client(WRONG, log_level=0, **watch.callbacks(stats=False)))
    error, start = "", time.monotonic()
    try:
        producer.produce("never", b"v")
        while not error and time.monotonic() - start < FAIL_FAST_S:
            try:
                producer.flush(0.5)
            except ConfigurationError as ex:
                error = str(ex)
    finally:
        producer.purge()  # nothing left to deliver, so closing does not wait for the broker
        producer.close()
    assert error.startswith("Kafka authentication failed") and "SCRAM-SHA-512" in error
    assert time.monotonic() - start < 15 and WRONG not in error


def test_preflight_accepts_good_and_rejects_bad_credentials(sasl_broker: SaslBroker) -> None:
    from pydantic import SecretStr

    def settings(password: str) -> Settings:
        return Settings(bootstrap=sasl_broker.bootstrap, security_protocol="SASL_PLAINTEXT",
                        sasl_mechanism="SCRAM-SHA-512", sasl_username=USER, sasl_password=SecretStr(password))

    assert preflight(settings(PASSWORD), timeout_s=30)
    start = time.monotonic()
    with pytest.raises(ConfigurationError, match="^Kafka authentication failed: .*SCRAM-SHA-512") as caught:
        preflight(settings(WRONG), timeout_s=30)
    assert time.monotonic() - start < 15 and WRONG not in str(caught.value)


def _cli_with_wrong_password(sasl_broker: SaslBroker, *args: str) -> tuple[int, str, str, float]:
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "LIQUIDSTREAM_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                        "LIQUIDSTREAM_SASL_MECHANISM": "SCRAM-SHA-512", "LIQUIDSTREAM_SASL_USERNAME": USER,
                        "LIQUIDSTREAM_SASL_PASSWORD": WRONG, "LIQUIDSTREAM_LOG_LEVEL": "DEBUG"}
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "liquidstream.pipeline.cli.entry", *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=FAIL_FAST_S + 30, check=False)
    except subprocess.TimeoutExpired as ex:
        pytest.fail(f"{args[0]} still running after {ex.timeout} s with a wrong password")
    return done.returncode, done.stdout, done.stderr, time.monotonic() - start


def _assert_fails_fast(rc: int, out: str, err: str, seconds: float) -> None:
    assert WRONG not in out + err and PASSWORD not in out + err, "a password was printed"
    assert rc != 0, f"exit 0 with a wrong password; stderr:\n{err[-2000:]}"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert "authentication" in last.lower(), f"last stderr line: {last!r}"
    assert seconds < FAIL_FAST_S, f"took {seconds:.1f} s"


def test_simulate_with_a_wrong_password_fails_fast(sasl_broker: SaslBroker) -> None:
    _assert_fails_fast(*_cli_with_wrong_password(sasl_broker, "simulate", "--bootstrap", sasl_broker.bootstrap,
                                                 "--topic", "sasl-sim", "--devices", "2", "--events", "10"))


def test_run_with_a_wrong_password_fails_fast(sasl_broker: SaslBroker) -> None:
    _assert_fails_fast(*_cli_with_wrong_password(sasl_broker, "run", "--bootstrap", sasl_broker.bootstrap,
                                                 "--input-topic", "sasl-run", "--group-id", "sasl-run",
                                                 "--channels", "4", "--device", "cpu", "--guarantee",
                                                 "at_least_once", "--exit-when-idle", "3"))
