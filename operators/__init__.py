"""liquidstream.operators: pure compute, no Kafka.

Contract: continuous-time cells advance per-device hidden states by each device's *real* time gap
(``cell(x, h, dt)``, dt in float seconds, one dt per row); :class:`LiquidOperator` takes columnar batches
(``device_ids``, ``ts_ms`` int64 epoch milliseconds, ``values`` float32 ``[N, C]``) and returns a
:class:`StepResult` with the next-reading forecast, the reading's anomaly score, alert flags and alerts.
Nothing here imports ``pipeline``; every setting arrives as an :class:`OperatorSettings` value.
"""

from operators.cells import CfCCell, LiquidCell, LTCCell, build_cell
from operators.config import OperatorSettings
from operators.errors import LiquidStreamError
from operators.forecaster import Forecaster
from operators.operator import LiquidOperator
from operators.result import Alert, EventStatus, StepResult
from operators.scoring import AnomalyScorer
from operators.state_store import DeviceStateStore

__all__ = [
    "Alert", "AnomalyScorer", "CfCCell", "DeviceStateStore", "EventStatus", "Forecaster", "LTCCell",
    "LiquidCell", "LiquidOperator", "LiquidStreamError", "OperatorSettings", "StepResult", "build_cell",
]
