"""liquidstream.pipeline.cli: the ``liquidstream`` command line.

Contract: :func:`main` parses the arguments, builds the one frozen :class:`~liquidstream.pipeline.settings.Settings`
(environment first, flags over it) and runs one sub-command; a
:class:`~liquidstream.operators.errors.LiquidStreamError` (or an unreadable file, or invalid settings) becomes one
line on stderr and exit code 2. The commands form one explicit table
(:data:`~liquidstream.pipeline.cli.entry.COMMANDS`), gathered from ``offline`` (demo, replay, train, evaluate),
``kafka`` (run, simulate), ``train`` (train-worker), ``ops`` (report) and ``reference`` (schema, settings); ``args``
holds what they share.
"""

from liquidstream.pipeline.cli.entry import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
