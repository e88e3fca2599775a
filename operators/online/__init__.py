"""liquidstream.operators.online: fine-tuning the forecaster from the stream, behind guards.

Contract: :class:`OnlineLearner` observes step results, keeps a replay buffer of complete windows
(:mod:`~liquidstream.operators.online.replay_buffer`) and, on ``learn()``, trains a candidate that the guards
(:mod:`~liquidstream.operators.online.guards`: learnable readings, drift projection, held-out improvement)
accept or reject; :class:`OnlineSettings` holds every threshold.  It never publishes anything: the trainer
worker in :mod:`liquidstream.pipeline.updates` signs and ships accepted models.
"""

from liquidstream.operators.online.config import OnlineSettings
from liquidstream.operators.online.learner import OnlineLearner

__all__ = ["OnlineLearner", "OnlineSettings"]
