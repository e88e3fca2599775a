"""liquidstream: liquid neural networks (LTC, CfC) as a Kafka stream-processing worker.

The public face.  Everything a user needs to embed the operator in their own consumer or faust agent:

* :class:`LiquidOperator` takes columnar batches (``device_ids``, ``ts_ms`` int64 epoch milliseconds,
  ``values`` float32 ``[N, C]``) and returns a :class:`StepResult` (forecast, anomaly score, alerts);
* :class:`Forecaster` (a cell and its Gaussian head) with :func:`load_model` / :func:`save_model`;
* the cells (:class:`CfCCell`, :class:`LTCCell`, :class:`LiquidCell`, :func:`build_cell`);
* :class:`OperatorSettings` (the operator's policies) and :class:`Settings` (the whole worker's, from
  ``LIQUIDSTREAM_*`` environment variables);
* the wire: :func:`decode_batch` (Kafka message values to a columnar batch, with rejects and their reasons)
  and :func:`encode_predictions` (a result to prediction records);
* the errors, all rooted in :class:`LiquidStreamError`.

Two layers sit below, installed under this root: :mod:`liquidstream.operators` (pure compute, no Kafka) and
:mod:`liquidstream.pipeline` (I/O and runtime); ``docs/architecture.md`` maps every concept to its module.
"""

from liquidstream.operators import (
    Alert,
    AlertReason,
    CfCCell,
    EventStatus,
    Forecaster,
    LiquidCell,
    LiquidOperator,
    LiquidStreamError,
    LTCCell,
    OperatorSettings,
    StepResult,
    build_cell,
)
from liquidstream.operators.model_io import load_model, save_model
from liquidstream.pipeline.errors import PipelineError
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.codec import decode_batch
from liquidstream.pipeline.wire.records import encode_predictions

__all__ = [
    "Alert", "AlertReason", "CfCCell", "EventStatus", "Forecaster", "LTCCell", "LiquidCell", "LiquidOperator",
    "LiquidStreamError", "OperatorSettings", "PipelineError", "Settings", "StepResult", "build_cell", "decode_batch",
    "encode_predictions", "load_model", "save_model",
]
