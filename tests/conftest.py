"""Shared Kafka fixtures for tests that talk to a real broker (marked ``@pytest.mark.integration``).

The broker is chosen once per session, in this order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` from the environment (a broker you run yourself; nothing is started);
2. a testcontainers Kafka container, only if a Docker engine answers a ping;
3. the native launcher ``deploy/kafka-local/kafka-local`` (a JVM broker on free local ports, in a
   temporary data dir, stopped again at the end of the session).

Fixtures are lazy: test runs that never request them never start a broker.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = REPO_ROOT / "deploy" / "kafka-local" / "kafka-local"

# Seconds. The first native start on a machine also fetches ~45 MB of jars with Maven; later starts
# take ~5-10 s. The launcher's own readiness timeout (90 s) applies after the fetch.
NATIVE_START_TIMEOUT_S = 600.0
NATIVE_STOP_TIMEOUT_S = 60.0
DOCKER_PING_TIMEOUT_S = 3
TOPIC_READY_TIMEOUT_S = 30.0


def _docker_engine_available() -> bool:
    """True iff a Docker engine answers a ping; False fast when there is no daemon or no SDK."""
    try:
        import docker  # optional (comes with testcontainers); imported here so its absence is fine

        client = docker.from_env(timeout=DOCKER_PING_TIMEOUT_S)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no SDK, no socket, refused, timeout, API error: all mean "no usable engine"
        return False


def _kafka_container_class() -> type[Any] | None:
    """testcontainers' KafkaContainer, wherever the installed version keeps it (None if not installed)."""
    try:
        # testcontainers >= 4.x: the maintained location (the old one warns that it is deprecated).
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        try:
            from testcontainers.kafka import KafkaContainer
        except ImportError:
            return None
    container_class: type[Any] = KafkaContainer
    return container_class


def _free_port_pair() -> tuple[int, int]:
    """Two distinct free TCP ports on 127.0.0.1 (client port, controller port).

    Both sockets are held open at once so the kernel cannot hand out the same port twice; there is a
    small race with other processes after closing them, which the launcher reports clearly.
    """
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        return first.getsockname()[1], second.getsockname()[1]


def _run_kafka_local(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    # The launcher is Python-stdlib only, so this interpreter can run it regardless of its shebang.
    return subprocess.run(
        [sys.executable, str(KAFKA_LOCAL), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _native_broker(data_dir: Path) -> Iterator[str]:
    port, controller_port = _free_port_pair()
    try:
        result = _run_kafka_local(
            "start",
            "--port",
            str(port),
            "--controller-port",
            str(controller_port),
            "--data-dir",
            str(data_dir),
            timeout_s=NATIVE_START_TIMEOUT_S,
        )
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines or not lines[-1].startswith("bootstrap="):
            pytest.fail(
                f"kafka-local start failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}",
                pytrace=False,
            )
        yield lines[-1].removeprefix("bootstrap=")
    finally:
        # Always, even when start failed or timed out half-way: the pid file is written as soon as
        # the JVM is spawned, and stop is a no-op when nothing runs.
        _run_kafka_local("stop", "--data-dir", str(data_dir), timeout_s=NATIVE_STOP_TIMEOUT_S)


def _container_broker(container_class: type[Any]) -> Iterator[str]:
    container = container_class()
    if hasattr(container, "with_kraft"):
        container = container.with_kraft()
    # The image's defaults (replication factor 3, min ISR 2) would make a single broker unable to
    # create the transaction-state topic; match the native broker's settings instead.
    for key, value in {
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
        "KAFKA_NUM_PARTITIONS": "4",
    }.items():
        container = container.with_env(key, value)
    container.start()
    try:
        yield str(container.get_bootstrap_server())
    finally:
        container.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a Kafka broker that supports transactions, for the whole test session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if configured:
        yield configured
        return
    container_class = _kafka_container_class()
    if container_class is not None and _docker_engine_available():
        yield from _container_broker(container_class)
        return
    yield from _native_broker(tmp_path_factory.mktemp("kafka-local"))


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    # Imported lazily so that collecting non-Kafka tests never needs confluent_kafka.
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


class MakeTopic(Protocol):
    """Signature of the ``make_topic`` fixture's value."""

    def __call__(
        self, partitions: int = 4, *, prefix: str = "it", config: dict[str, str] | None = None
    ) -> str: ...


def _wait_for_topic(admin: AdminClient, name: str, partitions: int) -> None:
    """Block until metadata shows `name` with all `partitions` led by a broker (or fail the test)."""
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
    last_seen = "no metadata yet"
    while time.monotonic() < deadline:
        topic = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if topic is not None and topic.error is None:
            leaders = [p.leader for p in topic.partitions.values()]
            if len(leaders) == partitions and all(leader >= 0 for leader in leaders):
                return
            last_seen = f"partition leaders {leaders}"
        elif topic is not None:
            last_seen = str(topic.error)
        time.sleep(0.1)
    pytest.fail(f"topic {name} not ready after {TOPIC_READY_TIMEOUT_S} s ({last_seen})", pytrace=False)


@pytest.fixture
def make_topic(kafka_admin: AdminClient) -> Iterator[MakeTopic]:
    """Factory: create a uniquely named topic (replication factor 1), wait until usable, return its name.

    Topics are deleted at teardown, which matters when ``KAFKA_BOOTSTRAP_SERVERS`` points at a
    long-lived broker.
    """
    # Documented import path; the package's type stubs only declare it in confluent_kafka.cimpl.
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    created: list[str] = []

    def make(partitions: int = 4, *, prefix: str = "it", config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        futures = kafka_admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
        )
        futures[name].result(timeout=TOPIC_READY_TIMEOUT_S)
        created.append(name)
        _wait_for_topic(kafka_admin, name, partitions)
        return name

    yield make
    if created:
        # Best effort: wait() never raises, and a leftover topic on a throwaway broker is harmless.
        deletions = kafka_admin.delete_topics(created, operation_timeout=10)
        concurrent.futures.wait(list(deletions.values()), timeout=TOPIC_READY_TIMEOUT_S)
