"""``liquidstream train-worker``: flags, the starting model, the learner, the loop
(:mod:`liquidstream.pipeline.updates.trainer`).

Starting model: the newest update of the lineage on ``model_updates_topic`` that verifies (a restarted trainer
continues its lineage rather than falling back to the file), else ``--model`` (``LIQUIDSTREAM_MODEL``), else
an untrained model (with a warning).  The next published ``seq`` is one above the highest *verified* seq on
the topic, so numbering stays monotonic across restarts.  The topic is read only after the update publisher
started (:func:`fenced_start`): its ``init_transactions`` fences any older trainer of the lineage first, so the
seq read then stays the lineage's newest until this trainer publishes.  A fenced trainer exits
:data:`~liquidstream.pipeline.updates.trainer.EXIT_FENCED` (3).  A signing key is required: nothing unsigned is ever
published.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from liquidstream.pipeline.cli.args import (
    Command,
    Handler,
    device_flag,
    kafka_flags,
    non_negative_float,
    port,
    positive_float,
    positive_int,
)
from liquidstream.pipeline.errors import ConfigurationError, PipelineError, TrainerFenced
from liquidstream.pipeline.ops.logs import setup_logging
from liquidstream.pipeline.serving import DEFAULT_CHANNELS
from liquidstream.pipeline.settings import Settings

if TYPE_CHECKING:  # torch is imported only when the command runs, not by `--help`
    from liquidstream.operators.forecaster import Forecaster
    from liquidstream.pipeline.ops.health import Health, ReadyCheck
    from liquidstream.pipeline.ops.metrics import Metrics
    from liquidstream.pipeline.ops.server import OpsServer
    from liquidstream.pipeline.updates.publisher import UpdatePublisher

log = logging.getLogger("liquidstream")
#: Liveness window of the trainer: one candidate training may hold the loop for minutes.
TRAINER_MAX_SILENCE_S = 900.0


def register(sub: Any) -> Handler:
    p = sub.add_parser("train-worker", help="fine-tune the forecaster on the live readings; publish signed updates")
    kafka_flags(p)
    p.add_argument("--input-topic", default=None, help="topic of the readings it learns from")
    p.add_argument("--group-id", default=None, help="serving group (the trainer's own group defaults to "
                                                   "<group-id>-trainer)")
    p.add_argument("--trainer-group-id", default=None, help="the trainer's consumer group (default: "
                                                            "<group-id>-trainer)")
    p.add_argument("--model-updates-topic", default=None, help="compacted topic of signed updates "
                                                               "(default model-updates)")
    p.add_argument("--model-lineage", default=None, help="record key of this model line (default forecaster)")
    p.add_argument("--model", default=None,
                   help="starting model (model.pt) when the topic has none (default: LIQUIDSTREAM_MODEL, else an "
                        "untrained one)")
    p.add_argument("--channels", type=positive_int, default=None,
                   help=f"channels of the untrained model used without any model (default {DEFAULT_CHANNELS})")
    device_flag(p)
    p.add_argument("--interval", dest="trainer_interval_s", type=positive_float, default=None, metavar="SECONDS",
                   help="seconds between candidate trainings (LIQUIDSTREAM_TRAINER_INTERVAL_S, default 60)")
    p.add_argument("--max-updates", type=positive_int, default=None,
                   help="exit 0 after publishing this many (default: no limit)")
    p.add_argument("--exit-when-idle", "--exit-when-idle-s", dest="exit_when_idle_s", type=non_negative_float,
                   default=None, metavar="SECONDS", help="stop (exit 0) after this long without input")
    p.add_argument("--batch-max-messages", type=positive_int, default=None, help="readings per batch at most")
    p.add_argument("--batch-max-ms", type=positive_int, default=None, help="ms to wait filling a batch")
    p.add_argument("--worker-id", default=None, help="identity of this trainer in records and logs (default: "
                                                    "host name + pid)")
    p.add_argument("--metrics-port", type=port, default=None, help="port of /metrics, /healthz, /readyz")
    return _cmd_train_worker


def starting_point(settings: Settings, channels: int | None, key: bytes) -> tuple[Forecaster, str, int]:
    """(model, version, highest verified seq on the topic) to start the learner from."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from liquidstream.operators import Forecaster
    from liquidstream.pipeline.serving import open_model
    from liquidstream.pipeline.updates.gate import UpdateGate
    from liquidstream.pipeline.updates.topic import ensure_updates_topic, read_latest, updates_consumer

    base, version = None, "untrained"
    if settings.model is not None:
        base, doc = open_model(settings.model)
        version = str(doc["version"])
    try:
        ensure_updates_topic(AdminClient(settings.kafka_client_config()), settings.model_updates_topic)
        consumer = updates_consumer(settings, "trainer-start")
        try:
            latest, top_seq = read_latest(consumer, settings.model_updates_topic,
                                          UpdateGate(key, settings.model_lineage), base)
        finally:
            consumer.close()
    except KafkaException as ex:
        msg = f"cannot read model-updates topic {settings.model_updates_topic}: {ex}"
        raise PipelineError(msg) from ex
    if latest is not None:
        log.info("starting from update seq %d version %s on %s", latest.seq, latest.version,
                 settings.model_updates_topic)
        return latest.model, latest.version, top_seq
    if base is None:
        n = channels or DEFAULT_CHANNELS
        log.warning("no model on %s and no --model: fine-tuning an UNTRAINED model with %d channels",
                    settings.model_updates_topic, n)
        base = Forecaster(n_channels=n, hidden_size=16)
    elif channels is not None and channels != base.n_channels:
        msg = f"--channels {channels} does not match model {settings.model} ({base.n_channels} channels)"
        raise ConfigurationError(msg)
    return base, version, top_seq


def fenced_start(settings: Settings, channels: int | None,
                 key: bytes) -> tuple[UpdatePublisher, Forecaster, str, int]:
    """The started publisher (older trainers of the lineage fenced), then :func:`starting_point`."""
    from liquidstream.pipeline.updates.publisher import UpdatePublisher

    publisher = UpdatePublisher(settings)
    publisher.start()
    return (publisher, *starting_point(settings, channels, key))


def _serve_ops(settings: Settings, ready: ReadyCheck) -> tuple[Metrics, Health, OpsServer]:
    from liquidstream.pipeline.ops.health import Health
    from liquidstream.pipeline.ops.metrics import Metrics
    from liquidstream.pipeline.ops.server import OpsServer

    metrics, health = Metrics(), Health(max_silence_s=TRAINER_MAX_SILENCE_S)
    server = OpsServer(metrics, health, ready)
    try:
        server.start(settings.metrics_port)
    except OSError as ex:
        if ex.errno != errno.EADDRINUSE or settings.metrics_port == 0:
            msg = f"cannot serve /metrics on port {settings.metrics_port}: {ex.strerror or ex}"
            raise ConfigurationError(msg) from ex
        server.start(0)
    return metrics, health, server


def _cmd_train_worker(args: argparse.Namespace, settings: Settings) -> int:
    from liquidstream.operators.online.learner import OnlineLearner
    from liquidstream.pipeline.ops.health import preflight
    from liquidstream.pipeline.serving import open_model
    from liquidstream.pipeline.updates.record import signing_key
    from liquidstream.pipeline.updates.trainer import EXIT_FENCED, TrainWorker

    worker_id = settings.resolved_worker_id("trainer")
    setup_logging(settings, static={"worker": worker_id})
    key = signing_key(settings.model_signing_key)
    if key is None:
        msg = "train-worker needs LIQUIDSTREAM_MODEL_SIGNING_KEY: it publishes signed updates only"
        raise ConfigurationError(msg)
    device = settings.torch_device()  # --device cuda without a GPU: one line now, not after connecting
    if settings.model is not None:
        open_model(settings.model)  # a missing or bad --model: one line now, before any connection
    preflight(settings)
    try:
        publisher, model, version, seq = fenced_start(settings, args.channels, key)
    except TrainerFenced as ex:  # a trainer of the lineage started at the same moment, and won
        log.error("trainer stopping: %s", ex)
        print(f"liquidstream train-worker: error: {ex}", file=sys.stderr)
        return EXIT_FENCED
    learner = OnlineLearner(model, settings.operator, settings.online, device=device, model_version=version)
    log.info("trainer on %s: model version %s, next seq %d", device, version, seq + 1)
    metrics, health, server = _serve_ops(settings, lambda: True)
    worker = TrainWorker(settings, learner, seq=seq, signing_key=key, worker_id=worker_id, publisher=publisher,
                         metrics=metrics, max_updates=args.max_updates, beat=health.beat)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, worker.stop)
    try:
        return worker.run()
    finally:
        server.stop()


COMMANDS: list[Command] = [("train-worker", register)]
