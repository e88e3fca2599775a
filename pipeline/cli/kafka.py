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
    mapping_flags,
    non_negative_float,
    non_negative_int,
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
    for flag, what in (("input", "readings consumed"), ("predictions", "prediction records"),
                       ("alerts", "alert records"), ("dlq", "dead letters")):
        p.add_argument(f"--{flag}-topic", default=None, help=f"topic of the {what}")
    p.add_argument("--group-id", default=None, help="consumer group (a new group starts from earliest "
                                                   "unless LIQUIDSTREAM_AUTO_OFFSET_RESET=latest)")
    p.add_argument("--model", default=None, help="model.pt saved by `liquidstream train`/`demo`; checked before any "
                                                 "connection is made")
    p.add_argument("--models", type=_topic_models, default=None, metavar="TOPIC=MODEL,...",
                   help="several models in one worker: each input topic with its model (replaces --input-topic and "
                        "--model; see docs/operations.md)")
    p.add_argument("--channels", type=positive_int, default=None,
                   help=f"channels of the untrained model used without --model (default: the mapping's channel "
                        f"fields, else {DEFAULT_CHANNELS})")
    device_flag(p)
    commissioning_flag(p)
    p.add_argument("--exit-when-idle", "--exit-when-idle-s", dest="exit_when_idle_s", type=non_negative_float,
                   default=None, metavar="SECONDS", help="stop (exit 0) after this long without input")
    p.add_argument("--batch-max-messages", type=positive_int, default=None, help="readings per batch at most")
    p.add_argument("--batch-max-ms", type=positive_int, default=None, help="ms to wait filling a batch")
    p.add_argument("--guarantee", choices=["exactly_once", "at_least_once"], default=None,
                   help="exactly_once: Kafka transactions; at_least_once: produce, flush, commit")
    p.add_argument("--worker-id", default=None, help="stable identity of this instance (transactional id suffix;"
                                                    " default host name + pid): keep it across restarts")
    p.add_argument("--changelog-topic", default=None, help="state changelog (default <group-id>-state-changelog)")
    p.add_argument("--metrics-port", type=port, default=None,
                   help="port of /metrics, /healthz, /readyz (0 = any free port, named in the log line 'serving "
                        "/metrics, /healthz, /readyz on HOST:PORT'); also /devices/{id}")
    p.add_argument("--metrics-host", default=None,
                   help="address the ops port binds (127.0.0.1: this host only; /devices/{id} serves sensor data)")
    mapping_flags(p)
    return _cmd_run


def _topic_models(text: str) -> dict[str, str]:
    """``a=m1.pt,b=m2.pt`` -> ``{"a": "m1.pt", "b": "m2.pt"}``."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if not pairs or any(not topic.strip() or not sep or not path.strip() for topic, sep, path in pairs):
        msg = f"must be TOPIC=MODEL pairs separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return {topic.strip(): path.strip() for topic, _, path in pairs}


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from liquidstream.pipeline.kafka.multi import MultiModelWorker, topic_settings
    from liquidstream.pipeline.kafka.worker import KafkaWorker
    from liquidstream.pipeline.ops.health import preflight
    from liquidstream.pipeline.serving import build_operator

    worker_id = settings.resolved_worker_id()
    setup_logging(settings, static={"worker": worker_id})
    settings = with_commissioning(args, settings)
    if settings.models and settings.model is not None:
        msg = "--models (LIQUIDSTREAM_MODELS) replaces --model (LIQUIDSTREAM_MODEL): give one of them"
        raise ConfigurationError(msg)
    per_topic = topic_settings(settings, worker_id) if settings.models else [settings]
    # every model is loaded and checked against its mapping before any connection
    operators = [build_operator(s, args.channels if not settings.models else None) for s in per_topic]
    preflight(settings)  # bad credentials: one clear line (exit 2) now, not timeouts half a minute later
    workers = [KafkaWorker(s, op, worker_id=s.worker_id or worker_id, serve_ops=True)
               for s, op in zip(per_topic, operators, strict=True)]
    runner = workers[0] if not settings.models else MultiModelWorker(workers, [s.input_topic for s in per_topic])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, runner.stop)  # finish the batch, commit it, close, exit 0
    return runner.run()


# ---------------------------------------------------------------------------------------------- simulate
def register_simulate(sub: Any) -> Handler:
    p = sub.add_parser("simulate", help="produce a simulated fleet's readings (and injected faults) to Kafka, "
                                        "and/or write them to a file")
    kafka_flags(p)
    p.add_argument("--input-topic", "--topic", dest="input_topic", default=None,
                   help="topic to produce the readings to (--topic: the old name)")
    p.add_argument("--devices", type=positive_int, default=100, help="simulated devices")
    p.add_argument("--events", type=positive_int, default=10_000, help="readings (faults come on top)")
    p.add_argument("--rate", type=non_negative_float, default=0.0, help="messages/s, 0 = no limit")
    p.add_argument("--anomaly-rate", type=non_negative_float, default=3.0,
                   help="injected incidents per device per hour of simulated time")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--channels", type=positive_int, default=DEFAULT_CHANNELS, help="channels per reading")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the readings (without the injected faults) to this JSONL file, for `train` and "
                        "`replay` (default: none)")
    p.add_argument("--out-only", action="store_true", help="write --out and produce nothing (no broker needed)")
    p.add_argument("--truth", default=None, help="write the ground-truth incidents here, JSONL (default: none)")
    p.add_argument("--malformed", type=non_negative_int, default=0, help="malformed messages to mix in (all kinds)")
    p.add_argument("--duplicates", type=non_negative_int, default=0, help="exact re-sends to mix in")
    p.add_argument("--late", type=non_negative_int, default=0, help="out-of-order (late) readings to mix in")
    return _cmd_simulate


def _cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka import Producer

    from liquidstream.pipeline.kafka.transactions import DeliveryTracker, flush_checked, producer_config
    from liquidstream.pipeline.offline.fleet_messages import build_messages, fleet_stream, produce_messages
    from liquidstream.pipeline.ops.health import preflight

    setup_logging(settings)
    if args.out_only and not args.out:
        msg = "--out-only needs --out FILE (where to write the readings)"
        raise ConfigurationError(msg)
    topic = settings.input_topic
    now_ms = time.time_ns() // 1_000_000
    stream = fleet_stream(args.devices, args.events, channels=args.channels, seed=args.seed,
                          anomaly_rate=args.anomaly_rate, end_ms=now_ms)
    if args.out:
        stream.to_jsonl(Path(args.out))
    if args.truth:
        stream.incidents_jsonl(Path(args.truth))
    summary: dict[str, Any] = {"readings": len(stream.ts_ms), "devices": args.devices,
                               "incidents": len(stream.incidents), "out": args.out}
    if args.out_only:
        print(json.dumps(summary), flush=True)
        return 0
    preflight(settings)
    messages = build_messages(stream, malformed=args.malformed, duplicates=args.duplicates, late=args.late,
                              now_ms=now_ms, max_payload_bytes=settings.max_payload_bytes, seed=args.seed)
    log.info("producing %d messages (%d readings, %d devices, %d incidents) to %s", len(messages),
             len(stream.ts_ms), args.devices, len(stream.incidents), topic)
    producer, tracker = Producer(producer_config(settings)), DeliveryTracker()
    start = time.monotonic()
    produce_messages(producer, topic, messages, rate=args.rate, on_delivery=tracker)
    flush_checked(producer, tracker)
    total_s = max(time.monotonic() - start, 1e-9)  # until every message was acknowledged
    print(json.dumps({"topic": topic, "messages": len(messages), **summary, "malformed": args.malformed,
                      "duplicates": args.duplicates, "late": args.late, "seconds": round(total_s, 3),
                      "messages_per_s": round(len(messages) / total_s, 1)}), flush=True)
    return 0


COMMANDS: list[Command] = [
    ("run", register_run),
    ("simulate", register_simulate),
]
