"""The project's exception hierarchy.

Every error liquidstream raises on purpose derives from :class:`LiquidStreamError`, so a caller can catch
one type.  ``pipeline`` subclasses these for I/O failures; ``operators`` never imports ``pipeline``, which is
why the root lives here.
"""

from __future__ import annotations


class LiquidStreamError(Exception):
    """Root of every error raised on purpose by liquidstream."""


class ConfigError(LiquidStreamError, ValueError):
    """A setting or hyperparameter is out of its valid range."""


class InputError(LiquidStreamError, ValueError):
    """A batch handed to an operator is malformed (shape, dtype, non-finite values)."""


class StateFormatError(LiquidStreamError, ValueError):
    """A state snapshot cannot be decoded (wrong magic, version or layout)."""


class ModelFormatError(LiquidStreamError, ValueError):
    """A saved model is missing files, has an unknown config, or does not match its state dict."""


class DeviceQueryError(InputError):
    """A question about one device that the operator cannot answer (:func:`liquidstream.operators.asof.forecast_at`).

    ``reason`` says why: ``unknown`` (no state for the device), ``no_reading`` (a row but no reading applied yet),
    ``before_last_reading`` (an instant earlier than its last reading), ``invalid`` (a malformed query).
    """

    def __init__(self, message: str, device_id: str, reason: str) -> None:
        super().__init__(message)
        self.device_id, self.reason = device_id, reason
