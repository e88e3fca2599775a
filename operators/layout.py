"""Row layout of the fused wave step's output blocks, named once for the writer and the reader.

:func:`~liquidstream.operators.fused_step.run_wave` writes, per wave, one float32 block and one int8 block,
channels first (one row per quantity, one column per reading: contiguous rows are cheap to fill on CUDA and
on the CPU alike); :meth:`~liquidstream.operators.operator.LiquidOperator.process` reads them back into a
:class:`~liquidstream.operators.result.StepResult`.  Both sides name rows through :class:`OutputRows`, so a new
quantity is added here and nowhere else.

>>> rows = OutputRows(channels=2)
>>> rows.forecast, rows.std, rows.z, rows.horizon, rows.score, rows.threshold, rows.anomaly_score, rows.float_rows
(slice(0, 2, None), slice(2, 4, None), slice(4, 6, None), 6, 7, 8, 9, 16)
>>> FLAG_IN_ALERT, FLAG_OPENED, FLAG_REASON, FLAG_CLOSED, FLAG_ROWS
(0, 1, 2, 3, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FLAG_CLOSED", "FLAG_IN_ALERT", "FLAG_OPENED", "FLAG_REASON", "FLAG_ROWS", "OutputRows"]

#: Rows of the int8 block: an alert is open after the reading | the reading opened one | the AlertReason code
#: (of the alert open after the reading, or of the one it closed) | the reading closed one.
FLAG_IN_ALERT, FLAG_OPENED, FLAG_REASON, FLAG_CLOSED = 0, 1, 2, 3
FLAG_ROWS = 4


@dataclass(frozen=True)
class OutputRows:
    """Rows of the float32 block for ``channels`` channels: three per-channel groups, then the scalars."""

    channels: int

    @property
    def forecast(self) -> slice:
        """Forecast of the next reading, raw units."""
        return slice(0, self.channels)

    @property
    def std(self) -> slice:
        """Its spread, raw units."""
        return slice(self.channels, 2 * self.channels)

    @property
    def z(self) -> slice:
        """|standardised residual| of this reading per channel, the largest over the likelihoods' residuals
        (``sqrt(r^2 / s2)``; inf on a stuck channel)."""
        return slice(2 * self.channels, 3 * self.channels)

    @property
    def horizon(self) -> int:
        """Seconds from this reading to the forecast's instant (the device's usual gap)."""
        return 3 * self.channels

    @property
    def score(self) -> int:
        """This reading's score: -log10 of its combined tail probability (decades of surprise)."""
        return 3 * self.channels + 1

    @property
    def threshold(self) -> int:
        """The score at which an alert opens: -log10(alert_probability)."""
        return 3 * self.channels + 2

    @property
    def anomaly_score(self) -> int:
        """The score mapped into [0, 1): L / (L + 10), L = -log10 p (monotone, no ties at the top)."""
        return 3 * self.channels + 3

    @property
    def alert_peak(self) -> int:
        """Largest score of the alert open after this reading, or of the one it closed, decades (else 0)."""
        return 3 * self.channels + 4

    @property
    def alert_readings(self) -> int:
        """Readings of the alert open after this reading, or of the one it closed, from the opening reading
        to this one included (else 0)."""
        return 3 * self.channels + 5

    @property
    def expected(self) -> slice:
        """This reading's forecast (the delta head's, at its real gap, before anything learnt from it), raw units:
        what an alert's explanation calls the expected value."""
        return slice(3 * self.channels + 6, 4 * self.channels + 6)

    @property
    def expected_std(self) -> slice:
        """Its spread, raw units (calibrated, as the next reading's)."""
        return slice(4 * self.channels + 6, 5 * self.channels + 6)

    @property
    def float_rows(self) -> int:
        return 5 * self.channels + 6
