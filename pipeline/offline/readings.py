"""Reading a JSONL file of readings the way the worker reads a topic: one codec, one set of reasons.

``replay``, ``train`` and ``report`` all read their input through :func:`read_jsonl`, so the three commands and
the Kafka worker accept and reject the same lines for the same reasons (the input mapping included: a long-shape
file is assembled by :func:`~liquidstream.pipeline.wire.assembly.assemble_long`).  No torch here: ``report`` uses
it too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.serving import check_mapping
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.wire.assembly import assemble_long
from liquidstream.pipeline.wire.codec import DecodedBatch, DecodeLimits, decode_batch

__all__ = ["read_jsonl", "read_lines"]


def _guess_channels(lines: list[bytes]) -> int:
    """Channel count of the first line that parses as a reading (the replay's reference length)."""
    for raw in lines:
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("values"), list) and doc["values"]:
            return len(doc["values"])
    msg = "no valid reading: no line of the input holds a reading with a non-empty 'values' list"
    raise ConfigurationError(msg)


def read_lines(path: Path, flag: str = "--input") -> list[bytes]:
    """The lines of an input file; a missing or unreadable one is a :class:`ConfigurationError` naming ``flag``."""
    try:
        return path.read_bytes().splitlines()
    except FileNotFoundError:
        msg = f"{flag} {path}: no such file (give a JSONL file of readings, e.g. from `liquidstream simulate --out`)"
    except IsADirectoryError:
        msg = f"{flag} {path}: is a folder; give a JSONL file of readings"
    except OSError as ex:
        msg = f"{flag} {path}: cannot read it ({ex.strerror})"
    raise ConfigurationError(msg)


def read_jsonl(path: Path, settings: Settings, n_channels: int | None,
               flag: str = "--input") -> tuple[DecodedBatch, int, int]:
    """Decode every line; returns the batch (``index`` = 0-based line numbers), the channel count and, for the long
    shape, how many lines went into assembled readings (else the number of valid lines)."""
    lines = read_lines(path, flag)
    fixed = settings.mapping.n_channels
    if n_channels is not None:
        check_mapping(settings, n_channels, "the model")
    c = n_channels or fixed or _guess_channels(lines)
    limits = DecodeLimits.from_settings(settings, c)
    now_ms = int(time.time() * 1000)
    if settings.mapping.shape == "long":
        batch, assembled = assemble_long(lines, None, limits, now_ms)
        return batch, c, assembled
    batch = decode_batch(lines, None, limits, now_ms)
    return batch, c, len(batch)
