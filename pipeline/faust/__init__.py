"""liquidstream.pipeline.faust: the same operator as one faust-streaming agent (``docs/faust.md``).

Contract: :mod:`~liquidstream.pipeline.faust.app` runs the worker's own batch step inside a faust agent, with
per-device state in a faust table; :mod:`~liquidstream.pipeline.faust.offsets` guards against committing past
unprocessed events; :mod:`~liquidstream.pipeline.faust.updates` follows signed model updates like the worker.
Nothing is imported here: faust is an optional dependency (``liquidstream[faust]``), loaded by the app only.
"""

__all__ = ["app", "offsets", "updates"]
