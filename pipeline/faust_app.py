"""The faust-streaming alternative to the confluent-kafka worker: the same operator as one faust agent.

``python -m pipeline.faust_app worker -l info`` (settings from ``LIQUIDSTREAM_*``, see ``docs/faust.md``).
Per batch (``batch_max_messages`` / ``batch_max_ms``) the agent runs :func:`pipeline.worker.handle_batch`, the
confluent worker's own step (one ``decode_batch``, one ``LiquidOperator.process``, the shared record builders),
so predictions, alerts and dead letters are the same records.  Device state lives in a faust table keyed by
device id (UTF-8 bytes -> ``DeviceStateStore.snapshot`` bytes); its changelog restores a device into the
operator the first time the device is seen after a start or a rebalance.  Events are acknowledged only after
their batch was handled, so offsets are committed (faust flushes the producer first) at least once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import ssl
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any, cast

import faust
from faust.types import TP, EventT, StreamT
from faust.types.auth import CredentialsT

from operators.operator import LiquidOperator
from pipeline.codec import DecodeLimits
from pipeline.errors import ConfigurationError
from pipeline.settings import Settings
from pipeline.worker import BatchOutput, DeviceRegistry, OutputTopics, handle_batch

log = logging.getLogger("liquidstream.faust")

TABLE_NAME = "device-state"
AGENT_NAME = "liquid-operator"
METADATA_TIMEOUT_S = 15.0


class EventMessage:
    """A faust event seen as a ``confluent_kafka.Message`` (what :func:`handle_batch` reads), raw bytes."""

    __slots__ = ("event",)

    def __init__(self, event: EventT[Any]) -> None:
        self.event = event

    def topic(self) -> str | None:
        return self.event.message.topic

    def partition(self) -> int | None:
        return self.event.message.partition

    def offset(self) -> int | None:
        return self.event.message.offset

    def key(self) -> bytes | None:
        return self.event.message.key

    def value(self) -> bytes | None:
        return self.event.message.value

    def headers(self) -> Any:
        return self.event.message.headers


class DeviceStateTable(faust.Table):  # type: ignore[type-arg]
    """Device state table whose changelog partition is the input partition of the device's readings.

    faust derives it from the *current* event, which a batch does not have; the agent records each device's
    partition in :attr:`home` before writing, so recovery of an input partition restores exactly its devices.
    """

    home: dict[bytes, int]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.home = {}

    def partition_for_key(self, key: Any) -> int | None:
        return self.home[key]


def librdkafka_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """librdkafka's default (``consistent_random``): CRC-32 of the key, random when keyless, so the
    faust app puts a device's outputs in the same partition as the confluent-kafka worker does."""
    if key is None:
        return random.choice(list(available) or list(all_partitions))  # noqa: S311 (spreading, not secrecy)
    return sorted(all_partitions)[zlib.crc32(key) % len(all_partitions)]


def input_partitions(settings: Settings) -> int:
    """Partition count of the input topic (the table's changelog must have as many)."""
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient(settings.kafka_client_config()).list_topics(settings.input_topic,
                                                                         timeout=METADATA_TIMEOUT_S)
    topic = metadata.topics.get(settings.input_topic)
    if topic is None or topic.error is not None or not topic.partitions:
        msg = f"input topic {settings.input_topic!r} not found on {settings.bootstrap}"
        raise ConfigurationError(msg)
    return len(topic.partitions)


def broker_credentials(settings: Settings) -> CredentialsT | None:
    """faust credentials for ``security_protocol`` (``kafka_config`` is librdkafka-only and not used)."""
    if settings.security_protocol == "PLAINTEXT":
        return None
    context = None
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        ca = settings.ssl_ca_location
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
        if settings.ssl_certificate_location is not None:
            key = settings.ssl_key_location
            context.load_cert_chain(settings.ssl_certificate_location, None if key is None else key)
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    password = None if settings.sasl_password is None else settings.sasl_password.get_secret_value()
    return faust.SASLCredentials(username=settings.sasl_username, password=password, ssl_context=context,
                                 mechanism=settings.sasl_mechanism or "PLAIN")


def _device_hint(message: EventMessage) -> str | None:
    """The device a message is for, before decoding: its key, else the payload's ``device_id`` (best effort)."""
    key = message.key()
    if key:
        return key.decode("utf-8", errors="replace")
    try:
        device = json.loads(message.value() or b"").get("device_id")
    except (ValueError, AttributeError):
        return None
    return device if isinstance(device, str) else None


class FaustStep:
    """The agent's state and per-batch work: one operator, its device registry, the state table."""

    def __init__(self, app: faust.App, settings: Settings, operator: LiquidOperator,
                 table: DeviceStateTable) -> None:
        self.app, self.operator, self.table = app, operator, table
        self.topics = OutputTopics(settings.predictions_topic, settings.alerts_topic, settings.dlq_topic)
        self.limits = DecodeLimits.from_settings(settings, operator.n_channels)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-faust"
        self.registry = DeviceRegistry()
        self.lock = asyncio.Lock()  # a batch and a revocation never interleave
        self.batches = self.consumed = 0

    def _compute(self, messages: list[EventMessage], saved: dict[str, bytes]) -> tuple[BatchOutput, dict[str, bytes]]:
        """Off the event loop: restore devices from the table, handle the batch, snapshot changed devices."""
        for blob in saved.values():
            self.operator.store.restore(blob)
        out = handle_batch(messages, self.operator, self.topics, self.limits, time.time_ns() // 1_000_000,
                           self.worker_id)
        return out, {d: self.operator.store.snapshot([d]) for d in out.device_partitions}

    async def handle(self, events: Sequence[EventT[Any]]) -> BatchOutput:
        """Process one batch and hand every output record to the producer; raises on any failure."""
        messages = [EventMessage(e) for e in events]
        async with self.lock:
            saved: dict[str, bytes] = {}
            for device in {d for d in map(_device_hint, messages) if d is not None}:
                blob = None if device in self.operator.store else self.table.get(device.encode("utf-8"))
                if blob is not None:
                    saved[device] = blob
            out, snapshots = await asyncio.to_thread(self._compute, messages, saved)
            if saved:
                log.info("restored %d device(s) from table %s", len(saved), TABLE_NAME)
            self.registry.note(out.device_partitions)
            send = self.app.producer.send
            # (forwarded input headers may hold null values; aiokafka writes those as null headers)
            pending = [await send(r.topic, r.key, r.value, None, None, cast(Any, r.headers)) for r in out.records]
            await asyncio.gather(*pending)  # delivered (acks=all) ...
            for device, blob in snapshots.items():  # ... before the state that follows from them
                key = device.encode("utf-8")
                self.table.home[key] = out.device_partitions[device][1]
                self.table[key] = blob
            await self.app.producer.flush()  # the changelog too, before the batch's offsets are acked
        self.batches += 1
        self.consumed += out.consumed
        from pipeline.worker import describe_range
        log.info("DEBUGX batch %d: %s", self.batches, describe_range(messages))
        return out

    async def on_revoked(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        """``app.on_partitions_revoked`` receiver (``args[0]``: the revoked partitions): forget their devices,
        whose state now belongs to the new owner (and its table)."""
        revoked = cast(set[TP], args[0] if args else kwargs.get("revoked", set()))
        async with self.lock:
            dropped = self.operator.store.drop(self.registry.release((tp.topic, tp.partition) for tp in revoked))
        log.info("partitions revoked: %d device(s) dropped from the operator", len(dropped))


def build_app(settings: Settings, operator: LiquidOperator | None = None) -> faust.App:
    """The faust app serving ``operator`` (default: ``settings.model``, as ``liquidstream run`` does)."""
    if operator is None:
        from pipeline.cli_kafka import build_operator

        operator = build_operator(settings, None)
    partitions = input_partitions(settings)
    app = faust.App(
        settings.group_id + "-faust", broker=f"kafka://{settings.bootstrap}",
        broker_credentials=broker_credentials(settings), store="memory://", web_enabled=False,
        topic_partitions=partitions, key_serializer="raw", value_serializer="raw",
        consumer_auto_offset_reset=settings.auto_offset_reset, producer_acks=-1,
        producer_partitioner=librdkafka_partitioner,
        stream_buffer_maxsize=max(4096, settings.batch_max_messages))
    # bytes in, bytes out: the app's raw serializers for the topic; key/value_type=bytes makes the table raw
    # (its serializers come from the types, JSON otherwise).  No shared faust.Schema: the table's changelog
    # topic would rewrite it, and a key that then fails to decode stops the stream without an error.
    source = app.topic(settings.input_topic, key_type=bytes, value_type=bytes)
    table = app.tables.add(DeviceStateTable(app, name=TABLE_NAME, beacon=app.tables.beacon, partitions=partitions,
                                            key_type=bytes, value_type=bytes,
                                            help="device id (UTF-8) -> DeviceStateStore snapshot"))
    step = FaustStep(app, settings, operator, cast(DeviceStateTable, table))
    within_s = settings.batch_max_ms / 1000.0

    async def liquid_operator(stream: StreamT[bytes]) -> None:
        # noack_take yields the events themselves and leaves acking to us: only a handled batch is acked.
        async for batch in cast(faust.Stream[bytes], stream).noack_take(settings.batch_max_messages, within_s):
            events = cast(Sequence[EventT[Any]], batch)
            log.info("DEBUGX got %d", len(events))
            await step.handle(events)
            for event in events:
                await stream.ack(event)

    app.agent(source, name=AGENT_NAME)(liquid_operator)
    # mode's SignalHandlerT rejects every function, even one of exactly its documented shape
    app.on_partitions_revoked.connect(step.on_revoked)  # type: ignore[arg-type]
    log.info("faust app %s: %s (%d partitions) -> %s, %s, %s; model %s", app.conf.id, settings.input_topic,
             partitions, settings.predictions_topic, settings.alerts_topic, settings.dlq_topic,
             operator.model_version)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Build the settings once and hand the faust CLI (``worker -l info``, ...) the app."""
    if argv is not None:
        sys.argv[1:] = list(argv)
    build_app(Settings()).main()


if __name__ == "__main__":
    main()
