"""liquidstream.operators.compiled: the step operator's compiled per-device path (numba, CPU).

Contract: :class:`CompiledStep` applies a planned batch (:func:`~liquidstream.operators.waves.plan_waves`) to the
state store exactly as the tensor waves of :func:`~liquidstream.operators.fused_step.run_wave` do (float32,
results equal to rounding: forecasts and scores within 1e-5, the same alerts and lifecycle records, the same
stored state), running each device's readings one after another in one compiled call instead of one wave per
reading.  It serves the CfC cell in its default mode (the default model), the Liquid cell and the LTC cell; the
other CfC modes (``no_gate``, ``pure``, no backbone layer) stay on the tensor path (:func:`compiled_cell` says
which).  CPU only.  numba compiles the kernel on its first use (about 15-20 s on a 2-core box) and caches the
machine code beside the module (``__pycache__``); :func:`warm_up` does it ahead of time.
"""

from liquidstream.operators.compiled.path import COMPILED_MIN_READINGS_PER_DEVICE, CompiledStep, compiled_cell, warm_up

__all__ = ["COMPILED_MIN_READINGS_PER_DEVICE", "CompiledStep", "compiled_cell", "warm_up"]
