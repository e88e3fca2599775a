"""liquidstream.pipeline.updates: signed model updates through a compacted Kafka topic.

Contract: a record (:mod:`~liquidstream.pipeline.updates.record`) carries safetensors weights, the model's
config and an HMAC signature; :class:`UpdateGate` decides what a process may adopt (signature, lineage,
order, architecture); :class:`ModelFollower` is the serving side, polled between batches;
:class:`UpdatePublisher` the trainer's transactional, fencing producer; :class:`TrainWorker` the
``train-worker`` loop that learns from the input topic and publishes what the guards accept.
"""

from liquidstream.pipeline.updates.follower import ModelFollower
from liquidstream.pipeline.updates.gate import UpdateGate
from liquidstream.pipeline.updates.publisher import UpdatePublisher
from liquidstream.pipeline.updates.trainer import TrainWorker

__all__ = ["ModelFollower", "TrainWorker", "UpdateGate", "UpdatePublisher"]
