"""liquidstream.pipeline: I/O and runtime around the operators.

Contract: everything that touches the outside world lives here (settings, wire schemas and codecs, the
Kafka worker, the faust app, file replay, the demo, the CLI); it drives :mod:`operators` with columnar
batches and one frozen :class:`~liquidstream.pipeline.settings.Settings` object built once at start-up.
"""

__all__ = ["Settings"]

from liquidstream.pipeline.settings import Settings
