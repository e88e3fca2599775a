"""liquidstream.pipeline.ops: what operators of a deployment see: metrics, probes, logs.

Contract: :class:`Metrics` (Prometheus), :class:`Health` and the readiness checks
(:mod:`~liquidstream.pipeline.ops.health`, with the broker watch and the credentials pre-flight), one
:class:`OpsServer` serving ``/metrics``, ``/healthz`` and ``/readyz``, and :func:`setup_logging`
(structured, with every secret redacted).  Used by the worker, the trainer and the faust app alike.
"""

from liquidstream.pipeline.ops.health import Health
from liquidstream.pipeline.ops.logs import setup_logging
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.ops.server import OpsServer

__all__ = ["Health", "Metrics", "OpsServer", "setup_logging"]
