"""Dead-letter records: what the worker publishes for a message it cannot (or will not) apply.

A dead letter keeps the input message intact so it can be inspected and replayed: the record **value is
the original payload bytes unchanged** (``None`` stays ``None``) and the **key is the original key**.
Why it failed and where it came from travel in headers (values are UTF-8 bytes):

=======================  ===================================================================
``ls.error.class``       :class:`~liquidstream.pipeline.wire.schemas.DeadLetterReason` value (``non_finite``)
``ls.error.reason``      human-readable detail (``values[3] is NaN``), at most 1 KiB
``ls.source.topic``      input topic
``ls.source.partition``  input partition (decimal)
``ls.source.offset``     input offset (decimal)
``ls.failed.at``         wall-clock time of the failure, epoch milliseconds (decimal)
``ls.worker``            id of the worker that rejected it (optional)
``ls.schema``            ``dead-letter``: these headers follow the published ``dead-letter`` schema
``ls.schema.version``    its version (:data:`~liquidstream.pipeline.wire.contract.SCHEMA_VERSION`)
=======================  ===================================================================

The original message's own headers are forwarded first (minus any stale ``ls.*`` ones from an earlier
trip through the DLQ), then the ``ls.*`` headers above.

Two exceptions, each said in a header, so that one hostile message cannot stop the worker (a dead letter the
producer refuses fails its whole batch, again after every restart):

* key + value + headers over :data:`MAX_DEAD_LETTER_BYTES` (librdkafka refuses records over
  ``message.max.bytes``, 1,000,000 by default, and the input may hold bigger ones: compressed batches are
  checked compressed): the value (then the key, then the forwarded headers) is cut to fit, and
  ``ls.truncated`` says what was cut, as JSON: ``{"value_bytes": 2500000, "value_kept": 899000,
  "value_sha256": "..."}`` (``key_*`` likewise, ``headers_dropped``: their count).  The original is still at
  its source offset.
* original headers the client cannot read (a header name that is not UTF-8): none are forwarded, and
  ``ls.headers.unreadable`` says why.

>>> hdrs = dead_letter_headers(DeadLetterReason.NON_FINITE, "values[3] is NaN", "readings", 2, 41,
...                            worker_id="w-1", failed_at_ms=1_700_000_000_000)
>>> hdrs[:2]
[('ls.error.class', b'non_finite'), ('ls.error.reason', b'values[3] is NaN')]
>>> parse_dead_letter_headers(hdrs)["ls.source.offset"]
'41'
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from liquidstream.pipeline.errors import EncodeError
from liquidstream.pipeline.wire.codec import Reject
from liquidstream.pipeline.wire.contract import schema_headers
from liquidstream.pipeline.wire.dead_letter_size import MAX_DEAD_LETTER_BYTES, dead_letter_budget, fit, headers_size
from liquidstream.pipeline.wire.schemas import DeadLetterReason
from liquidstream.pipeline.wire.types import Headers

__all__ = [
    "HEADER_CLASS", "HEADER_FAILED_AT", "HEADER_OFFSET", "HEADER_PARTITION", "HEADER_PREFIX", "HEADER_REASON",
    "HEADER_TOPIC", "HEADER_TRUNCATED", "HEADER_UNREADABLE", "HEADER_WORKER", "MAX_DEAD_LETTER_BYTES",
    "MAX_DETAIL_BYTES", "DeadLetter", "dead_letter_budget", "dead_letter_headers", "dead_letter_record",
    "parse_dead_letter_headers",
]

HEADER_PREFIX = "ls."
HEADER_CLASS = "ls.error.class"
HEADER_REASON = "ls.error.reason"
HEADER_TOPIC = "ls.source.topic"
HEADER_PARTITION = "ls.source.partition"
HEADER_OFFSET = "ls.source.offset"
HEADER_FAILED_AT = "ls.failed.at"
HEADER_WORKER = "ls.worker"
HEADER_TRUNCATED = "ls.truncated"
HEADER_UNREADABLE = "ls.headers.unreadable"
#: ``ls.error.reason`` is cut to this many bytes (UTF-8), ending in ``...``, so headers stay small.
MAX_DETAIL_BYTES = 1024

#: Kafka headers as confluent-kafka takes and returns them.
OriginalHeaders = Iterable[tuple[str, bytes | None]] | Callable[[], Iterable[tuple[str, bytes | None]] | None] | None


def forwarded_headers(original: OriginalHeaders) -> tuple[Headers, str | None]:
    """The original headers to forward (``ls.*`` ones dropped), and why none are when they cannot be read."""
    try:
        raw = original() if callable(original) else original
        return [(name, val) for name, val in raw or () if not name.startswith(HEADER_PREFIX)], None
    except (SystemError, UnicodeDecodeError) as ex:  # confluent-kafka: a header name that is not UTF-8
        cause = ex.__cause__ or ex.__context__ or ex
        return [], f"original headers not forwarded: {cause}"


def _detail_bytes(detail: str) -> bytes:
    raw = detail.encode("utf-8", errors="backslashreplace")  # a lone surrogate cannot break a header
    if len(raw) <= MAX_DETAIL_BYTES:
        return raw
    return raw[: MAX_DETAIL_BYTES - 3].decode("utf-8", errors="ignore").encode("utf-8") + b"..."


def dead_letter_headers(reason: DeadLetterReason | str, detail: str, topic: str, partition: int, offset: int,
                        *, worker_id: str | None = None,
                        failed_at_ms: int | None = None) -> list[tuple[str, bytes]]:
    """The ``ls.*`` headers of a dead letter.  ``failed_at_ms`` defaults to the wall clock (epoch ms).

    Raises :class:`EncodeError` when ``reason`` is not a :class:`DeadLetterReason` value.
    """
    try:
        error_class = DeadLetterReason(reason)
    except ValueError as ex:
        msg = f"unknown dead-letter reason {reason!r}"
        raise EncodeError(msg) from ex
    if failed_at_ms is None:
        failed_at_ms = time.time_ns() // 1_000_000
    headers = [
        (HEADER_CLASS, error_class.value.encode("ascii")),
        (HEADER_REASON, _detail_bytes(detail)),
        (HEADER_TOPIC, topic.encode("utf-8", errors="backslashreplace")),
        (HEADER_PARTITION, str(int(partition)).encode("ascii")),
        (HEADER_OFFSET, str(int(offset)).encode("ascii")),
        (HEADER_FAILED_AT, str(int(failed_at_ms)).encode("ascii")),
    ]
    if worker_id is not None:
        headers.append((HEADER_WORKER, worker_id.encode("utf-8", errors="backslashreplace")))
    return headers + [(name, value or b"") for name, value in schema_headers("dead-letter")]


def dead_letter_record(headers: Iterable[tuple[str, bytes | str | None]] | None) -> dict[str, Any]:
    """A dead letter's ``ls.*`` headers as the published ``dead-letter`` record (:class:`DeadLetterRecord`)."""
    h = parse_dead_letter_headers(headers)
    rec: dict[str, Any] = {"reason": h.get(HEADER_CLASS), "detail": h.get(HEADER_REASON),
                           "source": {"topic": h.get(HEADER_TOPIC), "partition": int(h.get(HEADER_PARTITION, -1)),
                                      "offset": int(h.get(HEADER_OFFSET, -1))},
                           "failed_at": int(h[HEADER_FAILED_AT]) if HEADER_FAILED_AT in h else None}
    optional = ((HEADER_WORKER, "worker"), (HEADER_UNREADABLE, "headers_unreadable"))
    rec.update({name: h[header] for header, name in optional if header in h})
    if HEADER_TRUNCATED in h:
        rec["truncated"] = json.loads(h[HEADER_TRUNCATED])
    return rec


def parse_dead_letter_headers(headers: Iterable[tuple[str, bytes | str | None]] | None) -> dict[str, str]:
    """The ``ls.*`` headers of a record as text (other headers are skipped; a repeated name keeps its
    last value; a null value reads as ``""``).  The inverse of :func:`dead_letter_headers`.

    >>> parse_dead_letter_headers([("trace-id", b"x"), ("ls.error.class", b"late"), ("ls.worker", None)])
    {'ls.error.class': 'late', 'ls.worker': ''}
    """
    parsed: dict[str, str] = {}
    for name, value in headers or ():
        if not name.startswith(HEADER_PREFIX):
            continue
        if value is None:
            parsed[name] = ""
        elif isinstance(value, str):
            parsed[name] = value
        else:
            parsed[name] = bytes(value).decode("utf-8", errors="replace")
    return parsed


@dataclass(frozen=True)
class DeadLetter:
    """One record for the dead-letter topic: original key, original value, forwarded + ``ls.*`` headers.

    >>> from liquidstream.pipeline.wire.codec import Reject
    >>> dl = DeadLetter.from_reject(Reject(0, DeadLetterReason.EMPTY, "payload is empty"), key=b"pump-7",
    ...                             value=b"", topic="readings", partition=0, offset=7, failed_at_ms=0)
    >>> dl.key, dl.value, dl.reason
    (b'pump-7', b'', <DeadLetterReason.EMPTY: 'empty'>)
    """

    key: bytes | None
    value: bytes | None
    headers: Headers

    @classmethod
    def build(cls, reason: DeadLetterReason | str, detail: str, *, key: bytes | None, value: bytes | None,
              topic: str, partition: int, offset: int, worker_id: str | None = None,
              failed_at_ms: int | None = None, original_headers: OriginalHeaders = None,
              max_bytes: int = MAX_DEAD_LETTER_BYTES) -> DeadLetter:
        """A dead letter for any reason (the operator's ``late``/``duplicate`` policies included), its key,
        value and headers cut to ``max_bytes`` together (:func:`dead_letter_budget`) when they exceed it.

        ``original_headers``: the input message's headers, or a callable returning them (``message.headers``:
        read here, so that headers the client cannot decode become ``ls.headers.unreadable``, not a crash).
        """
        forwarded, unreadable = forwarded_headers(original_headers)
        own = dead_letter_headers(reason, detail, topic, partition, offset, worker_id=worker_id,
                                  failed_at_ms=failed_at_ms)
        if unreadable is not None:
            own.append((HEADER_UNREADABLE, _detail_bytes(unreadable)))
        key, value, forwarded, cut = fit(key, value, forwarded, max_bytes - headers_size(own))
        if cut:
            own.append((HEADER_TRUNCATED, json.dumps(cut).encode("ascii")))
        headers: Headers = [*forwarded, *own]
        return cls(key=key, value=value, headers=headers)

    @classmethod
    def from_reject(cls, reject: Reject, *, key: bytes | None, value: bytes | None, topic: str,
                    partition: int, offset: int, worker_id: str | None = None,
                    failed_at_ms: int | None = None, original_headers: OriginalHeaders = None) -> DeadLetter:
        """The dead letter of a codec :class:`~liquidstream.pipeline.wire.codec.Reject`; ``key``/``value``/coordinates
        are
        those of input message ``reject.index``."""
        return cls.build(reject.reason, reject.detail, key=key, value=value, topic=topic, partition=partition,
                         offset=offset, worker_id=worker_id, failed_at_ms=failed_at_ms,
                         original_headers=original_headers)

    @property
    def reason(self) -> DeadLetterReason:
        """The ``ls.error.class`` header as an enum."""
        return DeadLetterReason(parse_dead_letter_headers(self.headers)[HEADER_CLASS])

    def produce_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Producer.produce(dlq_topic, **kwargs)``: key, value, headers."""
        return {"key": self.key, "value": self.value, "headers": list(self.headers)}
