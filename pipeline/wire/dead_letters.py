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

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from liquidstream.pipeline.errors import ConfigurationError, EncodeError
from liquidstream.pipeline.wire.codec import Reject
from liquidstream.pipeline.wire.schemas import DeadLetterReason
from liquidstream.pipeline.wire.types import Headers

__all__ = [
    "HEADER_CLASS", "HEADER_FAILED_AT", "HEADER_OFFSET", "HEADER_PARTITION", "HEADER_PREFIX", "HEADER_REASON",
    "HEADER_TOPIC", "HEADER_TRUNCATED", "HEADER_UNREADABLE", "HEADER_WORKER", "MAX_DEAD_LETTER_BYTES",
    "MAX_DETAIL_BYTES", "DeadLetter", "dead_letter_budget", "dead_letter_headers", "parse_dead_letter_headers",
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

#: Key + value + headers of a dead letter at most (bytes): librdkafka's default ``message.max.bytes`` is
#: 1,000,000 for all of them plus framing; the rest is room for ``ls.truncated`` and the framing.
MAX_DEAD_LETTER_BYTES = 900_000
_HEADER_FRAMING = 10  # bytes per header on the wire beyond name and value (two varints), at most

def dead_letter_budget(kafka_config: Mapping[str, str]) -> int:
    """Bytes a dead letter may take (key + value + headers): 90 % of the producer's ``message.max.bytes``
    when ``LIQUIDSTREAM_KAFKA_CONFIG`` sets it (the rest is room for ``ls.truncated`` and the framing), else
    :data:`MAX_DEAD_LETTER_BYTES` (librdkafka's default of 1,000,000).

    >>> dead_letter_budget({}), dead_letter_budget({"message.max.bytes": "200000"})
    (900000, 180000)
    """
    raw = kafka_config.get("message.max.bytes")
    if raw is None:
        return MAX_DEAD_LETTER_BYTES
    try:
        limit = int(raw)
    except ValueError as ex:
        msg = f"message.max.bytes in LIQUIDSTREAM_KAFKA_CONFIG must be an integer, got {raw!r}"
        raise ConfigurationError(msg) from ex
    if limit < 16_384:  # room for the ls.* headers (up to ~1.5 KB), a cut key and some of the value
        msg = f"message.max.bytes in LIQUIDSTREAM_KAFKA_CONFIG is {limit}: dead letters need at least 16384"
        raise ConfigurationError(msg)
    return limit * 9 // 10


#: Kafka headers as confluent-kafka takes and returns them.
OriginalHeaders = Iterable[tuple[str, bytes | None]] | Callable[[], Iterable[tuple[str, bytes | None]] | None] | None


def _headers_size(headers: Iterable[tuple[str, bytes | None]]) -> int:
    return sum(len(name.encode("utf-8", errors="surrogatepass")) + len(value or b"") + _HEADER_FRAMING
               for name, value in headers)


def _forwarded(original: OriginalHeaders) -> tuple[Headers, str | None]:
    """The original headers to forward (``ls.*`` ones dropped), and why none are when they cannot be read."""
    try:
        raw = original() if callable(original) else original
        return [(name, val) for name, val in raw or () if not name.startswith(HEADER_PREFIX)], None
    except (SystemError, UnicodeDecodeError) as ex:  # confluent-kafka: a header name that is not UTF-8
        cause = ex.__cause__ or ex.__context__ or ex
        return [], f"original headers not forwarded: {cause}"


def _fit(key: bytes | None, value: bytes | None, forwarded: Headers,
         room: int) -> tuple[bytes | None, bytes | None, Headers, dict[str, int | str]]:
    """Key, value and forwarded headers cut to ``room`` bytes together: value first, the key only past half
    the room, headers when they leave less than a quarter for the value; and what was cut."""
    cut: dict[str, int | str] = {}
    if len(key or b"") + len(value or b"") + _headers_size(forwarded) <= room:
        return key, value, forwarded, cut
    if key is not None and len(key) > room // 2:
        cut |= {"key_bytes": len(key), "key_kept": room // 2, "key_sha256": hashlib.sha256(key).hexdigest()}
        key = key[: room // 2]
    if forwarded and len(key or b"") + _headers_size(forwarded) > room - room // 4:
        cut["headers_dropped"] = len(forwarded)
        forwarded = []
    left = room - len(key or b"") - _headers_size(forwarded)
    if value is not None and len(value) > left:
        cut |= {"value_bytes": len(value), "value_kept": left, "value_sha256": hashlib.sha256(value).hexdigest()}
        value = value[:left]
    return key, value, forwarded, cut


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
    return headers


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
        forwarded, unreadable = _forwarded(original_headers)
        own = dead_letter_headers(reason, detail, topic, partition, offset, worker_id=worker_id,
                                  failed_at_ms=failed_at_ms)
        if unreadable is not None:
            own.append((HEADER_UNREADABLE, _detail_bytes(unreadable)))
        key, value, forwarded, cut = _fit(key, value, forwarded, max_bytes - _headers_size(own))
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
