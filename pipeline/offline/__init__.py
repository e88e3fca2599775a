"""liquidstream.pipeline.offline: the operator without a broker: demo, file replay, simulation, plots.

Contract: :mod:`~liquidstream.pipeline.offline.replay` streams a JSONL file of readings through the operator
exactly as the worker would (optionally training on each device's commissioning part) and writes the same
records; :mod:`~liquidstream.pipeline.offline.demo` simulates a fleet with injected incidents
(:mod:`~liquidstream.pipeline.offline.simulator`), trains, streams and scores it;
:mod:`~liquidstream.pipeline.offline.fleet_messages` turns a simulated fleet into Kafka messages (with
malformed, duplicate and late ones); :mod:`~liquidstream.pipeline.offline.report` plots devices.
"""

__all__ = ["demo", "fleet_messages", "progress", "replay", "report", "simulator"]
