"""The memory of :class:`~liquidstream.operators.state.store.DeviceStateStore`: its per-device layout, growth and
trimming.

Fields (per device row):

==================  ===============  =====================================================================
field               dtype / shape    meaning
==================  ===============  =====================================================================
``h``               float32 [H]      hidden state of the cell
``x_last``          float32 [C]      last applied reading, raw units
``mean``, ``var``   float32 [C]      running per-channel normalisation of this device (raw units)
``gap_ema``         float32          smoothed gap between readings, seconds (the forecast horizon)
``calib``           float32 [C]      long running mean of squared standardised residuals per channel: the
                                     device's own calibration of the model's predicted variance
``{k}_s2``          float32 [C]      anomaly likelihood of residual ``k`` (``d`` delta forecast, ``a``
                                     absolute forecast; ``l`` normal level, only with ``level_rule``):
                                     running mean of the squared residual, normalised units squared
``{k}_m``           float32          short running mean of the raw surprise ``max_c log1p(r^2 / s2)``
``{k}_mu``          float32          long-run mean of ``{k}_m``
``{k}_v``           float32          long-run variance of ``{k}_m``
``{k}_cal``         float32          empirical calibration: running rate of calm readings with a tail
                                     probability below 0.01, divided by 0.01 (1 = the Gaussian tail is right)
``lik_n``           int32            readings the likelihoods have learnt from (their learning rate)
``commissioning``   int32            this device's commissioning length in readings (-1: the setting's)
``alert_open``      bool             an alert is open on this device
``alert_age``       int32            readings since the open alert opened
``cooldown``        int32            readings during which no new alert opens
``calm``            int32            consecutive calm readings while an alert is open (hysteresis)
``alert_peak``      float32          largest score of the open alert so far, decades (0 when none is open)
``alert_reason``    int16            AlertReason code of the open alert (why it opened)
``stuck``           int16 [C]        consecutive exactly-repeated values per channel
``repeats``         bool [C]         the channel repeated values during commissioning (quantised, flat):
                                     the stuck rule leaves it alone
``last_ts_ms``      int64 (host)     event time of the last applied reading, epoch ms
``count``           int32 (host)     readings applied so far
``alert_open_ms``   int64 (host)     event time of the reading that opened the open alert, epoch ms (its id)
``gap_n``           int32 (host)     gaps between readings learnt by the sampling rhythm (silence alerts)
``gap_log_m``       float32 (host)   mean of log(gap in seconds), about the last 256 gaps
``gap_log_v``       float32 (host)   its variance
``gap_quiet``       int32 (host)     silent gaps in a row (3: the device changed its rate, the rhythm starts over)
``silence_ms``      int64 (host)     start of the open silence alert, epoch ms (its id; 0: none)
==================  ===============  =====================================================================

``last_ts_ms`` and ``count`` live in numpy on the host because the event-time policies run there; the
rest lives on the compute device.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

__all__ = ["GROWTH", "HOST_FIELDS", "LEVEL_FIELDS", "NEUTRAL", "TORCH_FIELDS", "likelihood_fields",
           "return_freed_memory"]



def likelihood_fields(key: str) -> tuple[tuple[str, torch.dtype, str], ...]:
    """The state of one anomaly likelihood (see :mod:`liquidstream.operators.scoring`), fields ``{key}_*``.

    >>> [name for name, _, _ in likelihood_fields("d")]
    ['d_s2', 'd_m', 'd_mu', 'd_v', 'd_cal']
    """
    return ((f"{key}_s2", torch.float32, "C"), (f"{key}_m", torch.float32, ""), (f"{key}_mu", torch.float32, ""),
            (f"{key}_v", torch.float32, ""), (f"{key}_cal", torch.float32, ""))


TORCH_FIELDS: tuple[tuple[str, torch.dtype, str], ...] = (
    # (name, dtype, shape kind: "H" hidden, "C" channels, "" scalar)
    ("h", torch.float32, "H"),
    ("x_last", torch.float32, "C"),
    ("mean", torch.float32, "C"),
    ("var", torch.float32, "C"),
    ("gap_ema", torch.float32, ""),
    ("calib", torch.float32, "C"),
    *likelihood_fields("d"),
    *likelihood_fields("a"),
    ("lik_n", torch.int32, ""),
    ("commissioning", torch.int32, ""),
    ("alert_open", torch.bool, ""),
    ("alert_age", torch.int32, ""),
    ("cooldown", torch.int32, ""),
    ("calm", torch.int32, ""),
    ("alert_peak", torch.float32, ""),
    ("alert_reason", torch.int16, ""),
    ("stuck", torch.int16, "C"),
    ("repeats", torch.bool, "C"),
)
#: The level likelihood's state: only with ``OperatorSettings.level_rule`` (an extra field set of the store).
LEVEL_FIELDS = likelihood_fields("l")
#: Neutral value of each field of a device never seen, where it is not 0: variances, residual energies and
#: calibration ratios start at 1 (nothing divides by zero); ``commissioning`` -1 means "the setting's length".
NEUTRAL: dict[str, int] = {"var": 1, "calib": 1, "commissioning": -1} | {
    f"{k}_{f}": 1 for k in ("d", "a", "l") for f in ("s2", "v", "cal")}
HOST_FIELDS: tuple[tuple[str, type[np.generic]], ...] = (("last_ts_ms", np.int64), ("count", np.int32),
                                                         ("alert_open_ms", np.int64), ("gap_n", np.int32),
                                                         ("gap_log_m", np.float32), ("gap_log_v", np.float32),
                                                         ("gap_quiet", np.int32), ("silence_ms", np.int64))
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
