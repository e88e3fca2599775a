"""liquidstream.pipeline.kafka: the confluent-kafka stream worker (``liquidstream run``).

Contract: :class:`KafkaWorker` consumes readings, runs each batch through :func:`handle_batch` (Kafka-free:
messages in, records and offsets out, in :mod:`~liquidstream.pipeline.kafka.batch_step`) and publishes
predictions, alerts, dead letters and state changelog records together with the input offsets: one Kafka
transaction per batch under exactly-once (:mod:`~liquidstream.pipeline.kafka.transactions`), or produce,
flush, commit under at-least-once (:mod:`~liquidstream.pipeline.kafka.at_least_once`).  On assignment the
state of the assigned partitions is restored from the changelog (:mod:`~liquidstream.pipeline.kafka.rebalance`,
:mod:`~liquidstream.pipeline.kafka.changelog`); bookkeeping and ops wiring have their own modules, and
:mod:`~liquidstream.pipeline.kafka.multi` runs several models in one process (one worker per input topic).
"""

from liquidstream.pipeline.kafka.batch_step import handle_batch
from liquidstream.pipeline.kafka.worker import KafkaWorker

__all__ = ["KafkaWorker", "handle_batch"]
