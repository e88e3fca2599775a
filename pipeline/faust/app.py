"""The faust-streaming alternative to the confluent-kafka worker: the same operator as one faust agent.

``python -m liquidstream.pipeline.faust.app worker -l info`` (``LIQUIDSTREAM_*`` settings; ``docs/faust.md``).  Per
batch the agent runs the worker's own step, :func:`liquidstream.pipeline.kafka.batch_step.handle_batch`, so the records
are the same.  Device state lives in a faust table (device id -> ``DeviceStateStore.snapshot([device_id])``) whose
changelog restores devices after restarts and rebalances.  At least once: a batch is acked once its outputs, then its
state, are delivered. Signed model updates are followed as the worker does, between batches
(:mod:`liquidstream.pipeline.faust.updates`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any, cast

import faust
from faust.types import TP, EventT, StreamT
from faust.types.tuples import FutureMessage

from liquidstream.operators.operator import LiquidOperator
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.faust.offsets import METADATA_TIMEOUT_S, Events, OffsetGuard
from liquidstream.pipeline.faust.updates import UPDATES_EVERY_S, ModelUpdates
from liquidstream.pipeline.kafka.batch_step import handle_batch
from liquidstream.pipeline.kafka.bookkeeping import DeviceRegistry, Stats
from liquidstream.pipeline.kafka.changelog import StateLayout
from liquidstream.pipeline.kafka.output import BatchOutput, OutputTopics
from liquidstream.pipeline.ops.logs import setup_logging
from liquidstream.pipeline.serving import build_operator
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.checks import LONG_SHAPE_NOT_FAUST
from liquidstream.pipeline.wire.codec import DecodeLimits

log = logging.getLogger("liquidstream.faust")
TABLE_NAME, AGENT_NAME = "device-state", "liquid-operator"
STATS_EVERY_S = 10.0  # seconds between stats lines (as the worker)


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
    def timestamp(self) -> tuple[int, int]:  # faust keeps float epoch seconds; Kafka's (type, epoch ms)
        ts = self.event.message.timestamp
        return (1, round(ts * 1000)) if ts else (0, 0)


class DeviceStateTable(faust.Table):  # type: ignore[type-arg]
    """State written per batch: :attr:`home` (device key -> input partition) pins each changelog record, which
    faust would put in the *current* event's partition; :attr:`sent` collects the changelog futures."""

    home: dict[bytes, int]
    sent: list[FutureMessage]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.home, self.sent = {}, []

    def partition_for_key(self, key: Any) -> int | None:
        return self.home[key]

    def send_changelog(self, *args: Any, **kwargs: Any) -> FutureMessage:
        self.sent.append(fut := super().send_changelog(*args, **kwargs))
        return fut


def librdkafka_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """librdkafka's default (CRC-32 of the key, random without): outputs land where the worker puts them."""
    if key is None:
        return random.choice(list(available) or list(all_partitions))  # noqa: S311 (spreading, not secrecy)
    return sorted(all_partitions)[zlib.crc32(key) % len(all_partitions)]


def input_partitions(settings: Settings) -> int:
    """Partition count of the input topic (the table's changelog gets as many)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())
    topic = admin.list_topics(settings.input_topic, timeout=METADATA_TIMEOUT_S).topics.get(settings.input_topic)
    if topic is None or topic.error is not None or not topic.partitions:
        msg = f"input topic {settings.input_topic!r} not found on {settings.bootstrap}"
        raise ConfigurationError(msg)
    return len(topic.partitions)


class FaustStep:
    """The agent's state and per-batch work: one operator, its device registry, the state table."""

    def __init__(self, app: faust.App, settings: Settings, operator: LiquidOperator, table: DeviceStateTable,
                 updates: ModelUpdates | None = None) -> None:
        self.app, self.operator, self.table, self.updates = app, operator, table, updates
        self.topics = OutputTopics.from_settings(settings)
        self.limits = DecodeLimits.from_settings(settings, operator.n_channels)
        self.worker_id = settings.resolved_worker_id("faust")
        self.layout, self.registry, self.stats = StateLayout(operator.store), DeviceRegistry(), Stats()
        self.guard, self.lock = OffsetGuard(app, settings), asyncio.Lock()  # (batches and revocations)

    def _restore(self, device_ids: Sequence[str]) -> None:
        """``before_process``: devices the operator lacks come from the table (GIL-safe dict reads, off-loop)."""
        blobs = [self.table.get(d.encode("utf-8")) for d in dict.fromkeys(device_ids) if d not in self.operator.store]
        for blob in blobs:
            if blob is not None:
                self.operator.store.restore(blob)
        if any(blobs):
            log.info("restored %d device(s) from table %s", sum(b is not None for b in blobs), TABLE_NAME)

    def _compute(self, messages: list[EventMessage]) -> tuple[BatchOutput, list[tuple[str, bytes]]]:
        """Off the event loop: adopt a model update, restore, handle the batch, snapshot its devices."""
        if self.updates is not None:  # between batches: the previous one is delivered, this one not begun
            self.updates.adopt()
        out = handle_batch(messages, self.operator, self.topics, self.limits, time.time_ns() // 1_000_000,
                           self.worker_id, before_process=self._restore)
        store = self.operator.store
        return out, self.layout.split(store.snapshot([d for d in out.device_partitions if d in store]))

    async def handle(self, events: Events) -> None:
        """Process one batch; returns once its outputs and then its devices' state are delivered."""
        started = time.monotonic()
        self.stats.first_message = self.stats.first_message or started
        async with self.lock:
            out, snapshots = await asyncio.to_thread(self._compute, [EventMessage(e) for e in events])
            self.registry.note(out.device_partitions)
            send = self.app.producer.send  # (null header values, forwarded from inputs, are fine for aiokafka)
            # faust takes the timestamp in seconds (None: the producer's clock)
            sent = [await send(r.topic, r.key, r.value, r.partition, r.timestamp / 1000.0 if r.timestamp else None,
                               cast(Any, r.headers)) for r in out.records]
            await asyncio.gather(*sent)  # outputs delivered (acks=all) before the state that follows them:
            for device, blob in snapshots:  # a crash in between replays the batch, it never skips outputs
                key = device.encode("utf-8")
                self.table.home[key] = out.device_partitions[device][1]
                self.table[key] = blob
            changelog, self.table.sent = self.table.sent, []
            await asyncio.gather(*changelog)
        self.stats.add(out, time.monotonic() - started)

    async def on_revoked(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        """``app.on_partitions_revoked`` receiver (``args[0]``: revoked partitions): their devices go."""
        revoked = cast(set[TP], args[0] if args else kwargs.get("revoked", set()))
        self.guard.forget(revoked)
        async with self.lock:
            dropped = self.operator.store.drop(self.registry.release((tp.topic, tp.partition) for tp in revoked))
        log.info("partitions revoked: %d device(s) dropped from the operator", len(dropped))

    def summary(self) -> dict[str, Any]:
        """The worker's stats figures, the devices held and the model served (and its updates, if followed)."""
        out = self.stats.as_dict() | {"devices": len(self.operator.store), "model_version": self.operator.model_version}
        return out | ({"model_updates": self.updates.stats()} if self.updates is not None else {})

    async def tick(self) -> None:
        if not self.lock.locked():
            await self.guard.unstall()
        log.info("stats %s", json.dumps(self.summary()))

    async def follow(self) -> None:
        """Timer: an idle agent has no batch to poll before, so poll here, never while a batch holds the lock."""
        if self.updates is not None and not self.lock.locked():
            async with self.lock:
                await asyncio.to_thread(self.updates.adopt)

    async def on_shutdown(self, sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        """``app.on_before_shutdown`` receiver (the consumer is stopped): close the follower, log final stats."""
        if self.updates is not None:
            await asyncio.to_thread(self.updates.close)
        log.info("final stats %s", json.dumps(self.summary() | {"final": True}))


def build_app(settings: Settings, operator: LiquidOperator | None = None) -> faust.App:
    """The faust app serving ``operator`` (default: ``settings.model``, as ``liquidstream run`` loads it)."""
    if settings.guarantee != "at_least_once" or settings.security_protocol != "PLAINTEXT":
        msg = "the faust app is at-least-once and PLAINTEXT only: set LIQUIDSTREAM_GUARANTEE=at_least_once"
        raise ConfigurationError(msg)
    if settings.mapping.shape == "long":
        raise ConfigurationError(LONG_SHAPE_NOT_FAUST)
    operator = operator or build_operator(settings, None)
    partitions = input_partitions(settings)
    updates = ModelUpdates.from_settings(settings, operator)
    if updates is not None:
        updates.start()
    app = faust.App(
        settings.group_id + "-faust", broker=f"kafka://{settings.bootstrap}", store="memory://", web_enabled=False,
        topic_partitions=partitions, key_serializer="raw", value_serializer="raw",
        consumer_auto_offset_reset=settings.auto_offset_reset, producer_acks=-1,
        producer_partitioner=librdkafka_partitioner, stream_buffer_maxsize=max(4096, settings.batch_max_messages))
    # Raw bytes: the topic by the app's serializers, the table by its bytes types (JSON otherwise).  No shared
    # faust.Schema: the changelog rewrites it, and a key then failing to decode silently stops the stream.
    source = app.topic(settings.input_topic, key_type=bytes, value_type=bytes)
    table = app.tables.add(DeviceStateTable(app, name=TABLE_NAME, beacon=app.tables.beacon, partitions=partitions,
                                            key_type=bytes, value_type=bytes,
                                            help="device id (UTF-8) -> DeviceStateStore snapshot"))
    step = FaustStep(app, settings, operator, cast(DeviceStateTable, table), updates)
    within_s = settings.batch_max_ms / 1000.0

    async def liquid_operator(stream: StreamT[bytes]) -> None:
        # noack_take yields the events themselves and leaves acking to us: only handled events are acked.
        async for batch in cast(faust.Stream[bytes], stream).noack_take(settings.batch_max_messages, within_s):
            ready, again = await step.guard.sort(cast(Events, batch))
            if ready:
                await step.handle(ready)
            for event in (*ready, *again):
                await stream.ack(event)

    app.agent(source, name=AGENT_NAME)(liquid_operator)
    app.timer(STATS_EVERY_S, name="tick")(step.tick)
    if updates is not None:
        app.timer(UPDATES_EVERY_S, name="model-updates")(step.follow)
    # mode's SignalHandlerT rejects every function, even one of exactly its documented shape
    app.on_partitions_revoked.connect(step.on_revoked)  # type: ignore[arg-type]
    app.on_before_shutdown.connect(step.on_shutdown)  # type: ignore[arg-type]
    log.info("faust app %s: %s (%d partitions), model %s", app.conf.id, settings.input_topic, partitions,
             operator.model_version)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Build the settings once, then hand the faust CLI (``worker -l info``, ...) the app built from them."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["worker"] and not {"--with-web", "--without-web"} & set(args):
        args.insert(1, "--without-web")  # the CLI's default (--with-web) would override web_enabled=False
    sys.argv[1:] = args
    settings = Settings()
    settings.configure_torch()
    # The start-up lines (model, partitions, model updates followed) come before faust configures logging;
    # without a handler they would be lost.  mode clears the root handlers when the worker starts, so this
    # one serves the build only and no line is written twice.
    setup_logging(settings)
    build_app(settings).main()


if __name__ == "__main__":
    main()
