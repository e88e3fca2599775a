"""The memory of :class:`~liquidstream.operators.state.store.DeviceStateStore`: its per-device layout, growth and
trimming.

Fields (per device row):

==================  ===============  =====================================================================
field               dtype / shape    meaning
==================  ===============  =====================================================================
``h``               float32 [H]      hidden state of the cell
``x_last``          float32 [C]      last applied reading, raw units
``mean``, ``var``   float32 [C]      running per-channel normalisation of this device (raw units)
``score_mean/var``  float32          running statistics of the device's anomaly score
``gap_ema``         float32          smoothed gap between readings, seconds (the forecast horizon)
``z2_fast``         float32          short running mean of squared calibrated residuals (sustained deviation)
``calib``           float32 [C]      long running mean of squared standardised residuals per channel: the
                                     device's own calibration of the model's predicted variance
``alert_open``      bool             an alert is open on this device
``alert_since_ms``  int64            event time the open alert began, epoch ms
``cooldown_ms``     int64            no new alert before this event time, epoch ms
``calm``            int32            consecutive calm readings while an alert is open (hysteresis)
``stuck``           int16 [C]        consecutive exactly-repeated values per channel
``last_ts_ms``      int64 (host)     event time of the last applied reading, epoch ms
``count``           int32 (host)     readings applied so far
==================  ===============  =====================================================================

``last_ts_ms`` and ``count`` live in numpy on the host because the event-time policies run there; the
rest lives on the compute device.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

__all__ = ["GROWTH", "HOST_FIELDS", "ONE_FIELDS", "TORCH_FIELDS", "return_freed_memory"]

TORCH_FIELDS: tuple[tuple[str, torch.dtype, str], ...] = (
    # (name, dtype, shape kind: "H" hidden, "C" channels, "" scalar)
    ("h", torch.float32, "H"),
    ("x_last", torch.float32, "C"),
    ("mean", torch.float32, "C"),
    ("var", torch.float32, "C"),
    ("score_mean", torch.float32, ""),
    ("score_var", torch.float32, ""),
    ("gap_ema", torch.float32, ""),
    ("z2_fast", torch.float32, ""),
    ("calib", torch.float32, "C"),
    ("alert_open", torch.bool, ""),
    ("alert_since_ms", torch.int64, ""),
    ("cooldown_ms", torch.int64, ""),
    ("calm", torch.int32, ""),
    ("stuck", torch.int16, "C"),
)
#: Fields whose neutral value is 1 (variances and residual energies), so nothing divides by zero.
ONE_FIELDS = frozenset({"var", "z2_fast", "calib"})
HOST_FIELDS: tuple[tuple[str, type[np.generic]], ...] = (("last_ts_ms", np.int64), ("count", np.int32))
#: Capacity grows by this factor (at least): 1.125 keeps the unused tail small (1/16 of the rows on
#: average) at the price of more, still amortised O(1), copies while devices arrive.
GROWTH = 1.125


def return_freed_memory() -> None:
    """Hand the blocks freed by a growth back to the OS (glibc keeps them in its heap otherwise).

    glibc raises its mmap threshold to the size of each freed mmap'd block (up to 32 MiB), so after a
    few growths the old blocks are heap memory that stays resident: measured 621 instead of 504 bytes
    per device at 100k devices.  ``malloc_trim`` costs milliseconds and runs only when the store grows.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
    return libc
