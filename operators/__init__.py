"""liquidstream.operators: pure compute, no Kafka.

Contract: continuous-time cells advance per-device hidden states by each device's *real* time gap
(``cell(x, h, dt)``, dt in float seconds, one dt per row); :class:`LiquidOperator` takes columnar batches
(``device_ids``, ``ts_ms`` int64 epoch milliseconds, ``values`` float32 ``[N, C]``) and returns a
:class:`StepResult` with the next-reading forecast, the reading's anomaly score, alert flags and alerts.
Nothing here imports ``pipeline``; every setting arrives as an :class:`OperatorSettings` value.
"""

from liquidstream.operators.cells import CfCCell, LiquidCell, LTCCell, build_cell
from liquidstream.operators.config import OperatorSettings
from liquidstream.operators.errors import LiquidStreamError
from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.operator import LiquidOperator
from liquidstream.operators.result import Alert, AlertReason, EventStatus, StepResult
from liquidstream.operators.scoring import AnomalyScorer
from liquidstream.operators.state.store import DeviceStateStore

__all__ = [
    "Alert", "AlertReason", "AnomalyScorer", "CfCCell", "DeviceStateStore", "EventStatus", "Forecaster", "LTCCell",
    "LiquidCell", "LiquidOperator", "LiquidStreamError", "OperatorSettings", "StepResult", "build_cell",
]
