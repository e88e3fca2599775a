"""Errors raised on purpose by the ``pipeline`` package (Kafka I/O, wire formats, configuration).

All derive from :class:`PipelineError`, itself a :class:`~liquidstream.operators.errors.LiquidStreamError`, so a caller
can catch one type for the whole project.  Bad *input messages* are not errors: the codec turns them into
dead letters (:mod:`liquidstream.pipeline.wire.dead_letters`) and never raises on them.

>>> from liquidstream.operators.errors import LiquidStreamError
>>> issubclass(DecodeError, LiquidStreamError) and issubclass(DecodeError, ValueError)
True
>>> err = KafkaDeliveryError("readings-dlq", "Broker: Message size too large", partition=3)
>>> str(err)
'delivery to readings-dlq[3] failed: Broker: Message size too large'
>>> err.topic, err.partition
('readings-dlq', 3)
"""

from __future__ import annotations

from liquidstream.operators.errors import ConfigError, LiquidStreamError

__all__ = [
    "ConfigurationError",
    "DecodeError",
    "EncodeError",
    "KafkaDeliveryError",
    "PipelineError",
    "TrainerFenced",
]


class PipelineError(LiquidStreamError):
    """Root of the errors raised by ``pipeline``."""


class ConfigurationError(PipelineError, ConfigError):
    """A worker setting is unusable (bad limits, inconsistent Kafka properties, model/settings mismatch).

    Also a :class:`~liquidstream.operators.errors.ConfigError`, so code that catches the operator's configuration
    errors catches these too.
    """


class DecodeError(PipelineError, ValueError):
    """A caller handed the codec something that is not a batch (for example keys and payloads of
    different lengths).  Malformed *messages* never raise: they become dead letters."""


class EncodeError(PipelineError, ValueError):
    """An output record cannot be serialised as strict JSON (NaN or infinity, unsupported type)."""


class KafkaDeliveryError(PipelineError, RuntimeError):
    """The producer could not deliver a record (prediction, alert or dead letter) to Kafka.

    ``topic`` is the destination, ``partition`` is ``None`` when the failure happened before a partition
    was assigned, ``reason`` is the client's error text.
    """

    def __init__(self, topic: str, reason: str, *, partition: int | None = None) -> None:
        self.topic = topic
        self.partition = partition
        self.reason = reason
        where = topic if partition is None else f"{topic}[{partition}]"
        super().__init__(f"delivery to {where} failed: {reason}")


class TrainerFenced(PipelineError):
    """A newer trainer of the same model lineage started: this one may publish nothing more and must stop.

    Raised by :class:`liquidstream.pipeline.updates.publisher.UpdatePublisher` when the broker refuses its transaction
    because another producer initialised the lineage's ``transactional.id`` (Kafka fencing).
    """

    def __init__(self, lineage: str, topic: str, transactional_id: str) -> None:
        self.lineage = lineage
        self.topic = topic
        self.transactional_id = transactional_id
        msg = (f"trainer of lineage {lineage!r} on {topic} was fenced by a newer trainer of the same lineage "
               f"(transactional.id {transactional_id}); stopping without publishing")
        super().__init__(msg)
