"""liquidstream.operators.state: every device's state in contiguous tensors, and its snapshot format.

Contract: :class:`DeviceStateStore` keeps one row per device (hidden state, running statistics, alert state,
clocks), named by the field table in :mod:`~liquidstream.operators.state.fields`; :class:`DeviceIndex` maps
device ids to rows without a Python dict per lookup; snapshots (:mod:`~liquidstream.operators.state.codec`)
are versioned bytes that restore bit for bit, which the Kafka changelog relies on.  Pure compute.
"""

from liquidstream.operators.state.device_index import DeviceIndex
from liquidstream.operators.state.store import DeviceStateStore

__all__ = ["DeviceIndex", "DeviceStateStore"]
