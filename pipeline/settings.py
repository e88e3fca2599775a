"""The one frozen settings object of a liquidstream process.

Built once (from ``LIQUIDSTREAM_*`` environment variables, then overridden by CLI flags) and passed down;
nothing reads the environment after start-up.  Nested operator settings use ``__``:
``LIQUIDSTREAM_OPERATOR__ALERT_PROBABILITY=1e-5``.  Extra Kafka client properties pass through verbatim from
``LIQUIDSTREAM_KAFKA_CONFIG`` (a JSON object) so every librdkafka setting, security included, is reachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.online.config import OnlineSettings
from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.wire.mapping import InputMapping

#: Event times before this are absurd for a live sensor (2000-01-01T00:00:00Z, epoch milliseconds).
DEFAULT_TS_MIN_MS = 946_684_800_000


class Settings(BaseSettings):
    """Every knob of the worker, the CLI and the demo.  Immutable once built."""

    model_config = SettingsConfigDict(env_prefix="LIQUIDSTREAM_", env_nested_delimiter="__", frozen=True,
                                      extra="ignore")

    # --- Kafka -----------------------------------------------------------------------------------------
    #: Kafka bootstrap servers, ``host:port[,host:port...]``.
    bootstrap: str = "127.0.0.1:9092"
    #: Topic the readings are consumed from (message key = device id).
    input_topic: str = "readings"
    #: Topic of the prediction records (schema ``prediction``).
    predictions_topic: str = "predictions"
    #: Topic of the alert records (schema ``alert``).
    alerts_topic: str = "alerts"
    #: Topic of the dead letters (original message, ``ls.*`` headers: schema ``dead-letter``).
    dlq_topic: str = "readings-dlq"
    #: Consumer group of the serving workers; also names the changelog and transactional ids.
    group_id: str = "liquidstream"
    #: Where a group without committed offsets starts reading the input topic.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    #: exactly_once: predictions, alerts, dead letters, state changelog records and the input offsets are
    #: committed in one Kafka transaction; at_least_once: produce, flush, then commit offsets.
    guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    #: Predictions and alerts carry their reading's event time as Kafka timestamp (false: the producer's clock).
    #: With CreateTime topics, retention counts from that time: replaying readings older than the output topics'
    #: ``retention.ms`` makes the broker delete their outputs soon after; use false (or LogAppendTime) then.
    event_time_timestamps: bool = True
    #: Compacted topic holding each device's state; default ``<group_id>-state-changelog`` so that two
    #: consumer groups never share state.
    changelog_topic: str | None = None
    #: Prefix of the transactional ids (one per worker instance); default ``<group_id>-tx``.
    transactional_id_prefix: str | None = None
    #: Stable identity of this worker instance (transactional id suffix, logs); default host name + pid.
    worker_id: str | None = None
    #: librdkafka ``security.protocol``.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    #: librdkafka ``sasl.mechanism``.
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    #: librdkafka ``sasl.username``.
    sasl_username: str | None = None
    #: librdkafka ``sasl.password`` (a secret: never printed, never logged).
    sasl_password: SecretStr | None = None
    #: librdkafka ``ssl.ca.location``: CA bundle verifying the brokers.
    ssl_ca_location: Path | None = None
    #: librdkafka ``ssl.certificate.location``: client certificate (mutual TLS).
    ssl_certificate_location: Path | None = None
    #: librdkafka ``ssl.key.location``: client private key.
    ssl_key_location: Path | None = None
    #: Any other librdkafka property, e.g. ``{"socket.keepalive.enable": "true"}``.
    kafka_config: dict[str, str] = Field(default_factory=dict)

    # --- batching ---------------------------------------------------------------------------------------
    #: Readings per batch at most.  Per-batch Kafka work (flush, changelog, commit or transaction) is paid once
    #: per batch, so a backlog drains faster in bigger batches: 5,000 -> 10,000 took the at-least-once drain
    #: from 44,930 to 57,358-58,721 readings/s on the 2-core box (docs/performance.md, entry 22).  Up to two
    #: batches of outputs are in flight, well inside librdkafka's 100,000-message producer queue.
    batch_max_messages: int = Field(default=10_000, ge=1)
    #: Milliseconds ``consume`` waits while filling one batch.  A backlog fills ``batch_max_messages`` at once
    #: whatever this is; under light load it bounds the wait a reading spends before its batch starts.
    #: Measured (docs/performance.md): 100 -> 10 ms cut p99 at 5,000 readings/s from 394-458 to 232-240 ms
    #: with the same backlog drain rate; an idle worker then polls 100 times a second.
    batch_max_ms: int = Field(default=10, ge=1)
    #: at_least_once only: a batch's delivery wait, changelog and offset commit overlap the next batches'
    #: consume and compute (same order, same guarantee: liquidstream.pipeline.kafka.at_least_once); off: one batch
    #: at a time.
    pipelined_commits: bool = True
    #: Bounded runs: stop (exit 0) after this many seconds without input; none = run until stopped.
    exit_when_idle_s: float | None = None

    # --- input validation (what goes to the dead-letter topic) ------------------------------------------
    #: A message value longer than this is an ``oversize`` dead letter (checked before parsing).
    max_payload_bytes: int = Field(default=64 * 1024, ge=64)
    #: Event times before this (epoch ms; default 2000-01-01) are ``bad_timestamp`` dead letters.
    ts_min_ms: int = DEFAULT_TS_MIN_MS
    #: Seconds an event time may run ahead of the worker's wall clock; further ahead is ``bad_timestamp``.  Not
    #: a day: an accepted reading from a clock hours ahead makes every later real reading of that device
    #: ``late`` until real time catches up.  Five minutes covers ordinary clock skew.
    max_future_s: float = Field(default=300.0, ge=0)
    #: A consumed reading without a message key is dead-lettered (``key_mismatch``): per-device state is
    #: partitioned by key.  False accepts keyless readings (safe only on a one-partition input topic).
    require_key: bool = True
    #: Which JSON shape the input has and where device id, time and channels are in it
    #: (``LIQUIDSTREAM_MAPPING__SHAPE=wide``, ``..._DEVICE_FIELD``, ...; :mod:`liquidstream.pipeline.wire.mapping`).
    mapping: InputMapping = Field(default_factory=InputMapping)

    # --- model and compute -------------------------------------------------------------------------------
    #: Model to serve (``model.pt`` with its ``model.json``, from ``liquidstream train``); none = untrained.
    model: Path | None = None
    #: Several models in one worker: input topic -> model file, as JSON (``{"line-a": "a.pt", "line-b": "b.pt"}``).
    #: Each topic runs as its own worker (group ``<group_id>.<topic>``) in this process; empty = one model.
    models: dict[str, Path] = Field(default_factory=dict)
    #: With ``models``: input topic -> its own input mapping (JSON), for topics whose shape differs from ``mapping``.
    mappings: dict[str, InputMapping] = Field(default_factory=dict)
    #: Compute device: ``auto`` takes the GPU when PyTorch sees one.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Operator policies and scoring knobs (``LIQUIDSTREAM_OPERATOR__*``).
    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    #: PyTorch intra-op CPU threads; 0 = half the cores (at least 1).  Small per-wave tensors gain nothing
    #: from many threads, and an oversubscribed machine (Kafka client threads, other processes) makes
    #: OpenMP spin: measured 10x slower per batch with 2 threads than with 1 on a busy 2-core box.
    torch_threads: int = Field(default=0, ge=0)

    # --- online fine-tuning (`liquidstream train-worker`) and signed model updates -------------------------
    #: Compacted topic of signed model updates (key = lineage); one partition keeps a lineage's records ordered.
    model_updates_topic: str = "model-updates"
    #: The model lineage published and followed (the record key: compaction keeps its latest update).
    model_lineage: str = Field(default="forecaster", min_length=1)
    #: HMAC-SHA256 key signing model updates (>= 16 bytes).  Without it nothing is published or adopted.
    model_signing_key: SecretStr | None = None
    #: Whether ``run`` swaps in verified updates from ``model_updates_topic``; None = when a key is set.
    #: On without a key, every update is rejected (reason ``no_key``).
    follow_model_updates: bool | None = None
    #: Consumer group of the trainer on the input topic; default ``<group_id>-trainer``.
    trainer_group_id: str | None = None
    #: Seconds between two candidate trainings of the trainer (and between its offset commits).
    trainer_interval_s: float = Field(default=60.0, gt=0)
    #: Online fine-tuning and its guards (``LIQUIDSTREAM_ONLINE__*``).
    online: OnlineSettings = Field(default_factory=lambda: OnlineSettings.model_validate({}))

    # --- operations -------------------------------------------------------------------------------------
    #: Port of ``/metrics``, ``/healthz``, ``/readyz`` and ``/devices/{id}`` (0 = any free port, named in the log).
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    #: Address the ops port binds: ``0.0.0.0`` every interface (probes and scrapes come from outside the pod),
    #: ``127.0.0.1`` this host only.  ``/devices/{id}`` serves sensor data: bind narrowly or set ``query_token``.
    metrics_host: str = Field(default="0.0.0.0", min_length=1)  # noqa: S104 - the pod IP must answer probes
    #: Answer ``GET /devices/{id}[?at=EPOCH_MS]`` on the ops port (a device's forecast at that instant, from this
    #: worker's state; 404 for a device another worker owns).  False: 404 on that path.
    device_queries: bool = True
    #: Bearer token ``GET /devices/{id}`` must carry (``Authorization: Bearer <token>``; 401 otherwise); a secret,
    #: never logged.  None: no token asked.  ``/metrics`` and the probes never ask for one.
    query_token: SecretStr | None = None
    #: How producers of the input topic place a key on a partition, so that a query for a device this worker does
    #: not hold can name its partition: ``consistent_random`` (librdkafka's default, CRC-32 of the key: every
    #: confluent-kafka/librdkafka producer, this project's included) or ``murmur2_random`` (the Java client's).
    input_partitioner: Literal["consistent_random", "murmur2_random"] = "consistent_random"
    #: Log lines as JSON objects or human text; unset: human on a terminal, JSON elsewhere.
    log_format: Literal["json", "human"] = "human"
    #: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``.
    log_level: str = "INFO"

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka properties shared by consumers, producers and admin clients (secrets included)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        for key, path in (("ssl.ca.location", self.ssl_ca_location),
                          ("ssl.certificate.location", self.ssl_certificate_location),
                          ("ssl.key.location", self.ssl_key_location)):
            if path is not None:
                conf[key] = str(path)
        conf.update(self.kafka_config)
        return conf

    @property
    def changelog(self) -> str:
        """The state changelog topic actually used."""
        return self.changelog_topic or f"{self.group_id}-state-changelog"

    @property
    def trainer_group(self) -> str:
        """The trainer's consumer group actually used."""
        return self.trainer_group_id or f"{self.group_id}-trainer"

    @property
    def follows_model_updates(self) -> bool:
        """Whether a serving worker follows ``model_updates_topic``."""
        if self.follow_model_updates is None:
            return self.model_signing_key is not None
        return self.follow_model_updates

    def resolved_worker_id(self, role: str = "") -> str:
        """``worker_id`` if set, else host name and pid, with ``-role`` appended for a process of another role
        (``trainer``, ``faust``) so that two kinds of process on one host never share an identity.

        >>> Settings(worker_id="w-1").resolved_worker_id("trainer")
        'w-1'
        """
        if self.worker_id:
            return self.worker_id
        import os
        import socket

        base = f"{socket.gethostname()}-{os.getpid()}"
        return f"{base}-{role}" if role else base

    def configure_torch(self) -> None:
        """Apply process-wide PyTorch settings (CPU threads); call once at start-up."""
        import os

        import torch

        threads = self.torch_threads or max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(threads)

    def torch_device(self) -> str:
        """``cuda`` when asked for or when ``auto`` finds a GPU, else ``cpu``."""
        if self.device == "cpu":
            return "cpu"
        import torch  # local: settings stay importable without initialising torch

        if self.device == "cuda" and not torch.cuda.is_available():
            msg = "device cuda: PyTorch sees no CUDA GPU here; use --device cpu (or auto: the GPU when there is one)"
            raise ConfigurationError(msg)
        return "cuda" if torch.cuda.is_available() else "cpu"
