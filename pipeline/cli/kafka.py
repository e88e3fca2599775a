"""The Kafka sub-commands of ``liquidstream``: ``run`` (the stream worker), ``simulate`` (a fleet producer),
``train-worker`` (online fine-tuning, in :mod:`liquidstream.pipeline.cli.train`).

Registered through :data:`COMMANDS` (``liquidstream.pipeline.cli.entry`` imports it).  Flags whose destination is a
:class:`~liquidstream.pipeline.settings.Settings` field (``--bootstrap``, ``--input-topic``, ``--group-id``,
``--model``, ``--exit-when-idle`` -> ``exit_when_idle_s`` ...) default to None so that a flag left out keeps the
``LIQUIDSTREAM_*`` environment's value.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from liquidstream.pipeline.cli.args import (
    Command,
    Handler,
    commissioning_flag,
    device_flag,
    kafka_flags,
    non_negative_float,
    port,
    positive_int,
    with_commissioning,
)
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.ops.logs import setup_logging
from liquidstream.pipeline.serving import DEFAULT_CHANNELS
from liquidstream.pipeline.settings import Settings

log = logging.getLogger("liquidstream")

# ---------------------------------------------------------------------------------------------- run
def register_run(sub: Any) -> Handler:
    p = sub.add_parser("run", help="the stream worker: readings in; predictions, alerts, dead letters out")
    kafka_flags(p)
    for flag in ("input", "predictions", "alerts", "dlq"):
        p.add_argument(f"--{flag}-topic", default=None)
    p.add_argument("--group-id", default=None, help="consumer group (a new group starts from earliest "
                                                   "unless LIQUIDSTREAM_AUTO_OFFSET_RESET=latest)")
    p.add_argument("--model", default=None, help="model.pt saved by `liquidstream train`/`demo`")
    p.add_argument("--channels", type=positive_int, default=None,
                   help=f"channels of the untrained model used without --model (default {DEFAULT_CHANNELS})")
    device_flag(p)
    commissioning_flag(p)
    p.add_argument("--exit-when-idle", dest="exit_when_idle_s", type=non_negative_float, default=None,
                   metavar="SECONDS", help="stop (exit 0) after this long without input")
    p.add_argument("--batch-max-messages", type=positive_int, default=None)
    p.add_argument("--batch-max-ms", type=positive_int, default=None, help="ms to wait filling a batch")
    p.add_argument("--guarantee", choices=["exactly_once", "at_least_once"], default=None,
                   help="exactly_once (default): Kafka transactions; at_least_once: produce, flush, commit")
    p.add_argument("--worker-id", default=None, help="stable identity of this instance (transactional id suffix;"
                                                    " default host name + pid): keep it across restarts")
    p.add_argument("--changelog-topic", default=None, help="state changelog (default <group-id>-state-changelog)")
    p.add_argument("--metrics-port", type=port, default=None,
                   help="port of /metrics, /healthz, /readyz (LIQUIDSTREAM_METRICS_PORT, default 9108; 0 = any free "
                        "port, named in the log line 'serving /metrics, /healthz, /readyz on HOST:PORT')")
    return _cmd_run


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from liquidstream.pipeline.kafka.worker import KafkaWorker
    from liquidstream.pipeline.ops.health import preflight
    from liquidstream.pipeline.serving import build_operator

    worker_id = settings.resolved_worker_id()
    setup_logging(settings, static={"worker": worker_id})
    preflight(settings)  # bad credentials: one clear line (exit 2) now, not timeouts half a minute later
    settings = with_commissioning(args, settings)
    worker = KafkaWorker(settings, build_operator(settings, args.channels), worker_id=worker_id, serve_ops=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, worker.stop)  # finish the batch, commit it, close, exit 0
    return worker.run()


# ---------------------------------------------------------------------------------------------- simulate
def register_simulate(sub: Any) -> Handler:
    p = sub.add_parser("simulate", help="produce a simulated fleet's readings (and injected faults) to Kafka")
    kafka_flags(p)
    p.add_argument("--topic", default=None, help="input topic (default: LIQUIDSTREAM_INPUT_TOPIC)")
    p.add_argument("--devices", type=positive_int, default=100)
    p.add_argument("--events", type=positive_int, default=10_000, help="readings (faults come on top)")
    p.add_argument("--rate", type=non_negative_float, default=0.0, help="messages/s, 0 = no limit")
    p.add_argument("--anomaly-rate", type=non_negative_float, default=3.0,
                   help="injected incidents per device per hour of simulated time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=positive_int, default=DEFAULT_CHANNELS)
    p.add_argument("--truth", default=None, help="write the ground-truth incidents here (JSONL)")
    p.add_argument("--malformed", type=int, default=0, help="malformed messages to mix in (all kinds)")
    p.add_argument("--duplicates", type=int, default=0, help="exact re-sends to mix in")
    p.add_argument("--late", type=int, default=0, help="out-of-order (late) readings to mix in")
    return _cmd_simulate


def _cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka import Producer

    from liquidstream.pipeline.kafka.transactions import DeliveryTracker, flush_checked, producer_config
    from liquidstream.pipeline.offline.fleet_messages import build_messages, fleet_stream, produce_messages
    from liquidstream.pipeline.ops.health import preflight

    setup_logging(settings)
    if min(args.malformed, args.duplicates, args.late) < 0:
        msg = "--malformed, --duplicates and --late must be >= 0"
        raise ConfigurationError(msg)
    preflight(settings)
    topic = args.topic or settings.input_topic
    now_ms = time.time_ns() // 1_000_000
    stream = fleet_stream(args.devices, args.events, channels=args.channels, seed=args.seed,
                          anomaly_rate=args.anomaly_rate, end_ms=now_ms)
    messages = build_messages(stream, malformed=args.malformed, duplicates=args.duplicates, late=args.late,
                              now_ms=now_ms, max_payload_bytes=settings.max_payload_bytes, seed=args.seed)
    if args.truth:
        stream.incidents_jsonl(Path(args.truth))
    log.info("producing %d messages (%d readings, %d devices, %d incidents) to %s", len(messages),
             len(stream.ts_ms), args.devices, len(stream.incidents), topic)
    producer, tracker = Producer(producer_config(settings)), DeliveryTracker()
    start = time.monotonic()
    produce_messages(producer, topic, messages, rate=args.rate, on_delivery=tracker)
    flush_checked(producer, tracker)
    total_s = max(time.monotonic() - start, 1e-9)  # until every message was acknowledged
    print(json.dumps({"topic": topic, "messages": len(messages), "readings": len(stream.ts_ms),
                      "devices": args.devices, "malformed": args.malformed, "duplicates": args.duplicates,
                      "late": args.late, "incidents": len(stream.incidents), "seconds": round(total_s, 3),
                      "messages_per_s": round(len(messages) / total_s, 1)}), flush=True)
    return 0


COMMANDS: list[Command] = [
    ("run", register_run),
    ("simulate", register_simulate),
]
