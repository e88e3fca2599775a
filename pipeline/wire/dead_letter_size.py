"""How big a dead letter may be, and how one too big is cut to fit
(:mod:`~liquidstream.pipeline.wire.dead_letters`).

librdkafka refuses a record over ``message.max.bytes`` and the input may hold bigger ones (compressed batches are
checked compressed): one hostile message must not fail its batch after every restart, so its dead letter is cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.wire.types import Headers

__all__ = ["MAX_DEAD_LETTER_BYTES", "dead_letter_budget", "fit", "headers_size"]

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


def headers_size(headers: Iterable[tuple[str, bytes | None]]) -> int:
    return sum(len(name.encode("utf-8", errors="surrogatepass")) + len(value or b"") + _HEADER_FRAMING
               for name, value in headers)


def fit(key: bytes | None, value: bytes | None, forwarded: Headers,
         room: int) -> tuple[bytes | None, bytes | None, Headers, dict[str, int | str]]:
    """Key, value and forwarded headers cut to ``room`` bytes together: value first, the key only past half
    the room, headers when they leave less than a quarter for the value; and what was cut."""
    cut: dict[str, int | str] = {}
    if len(key or b"") + len(value or b"") + headers_size(forwarded) <= room:
        return key, value, forwarded, cut
    if key is not None and len(key) > room // 2:
        cut |= {"key_bytes": len(key), "key_kept": room // 2, "key_sha256": hashlib.sha256(key).hexdigest()}
        key = key[: room // 2]
    if forwarded and len(key or b"") + headers_size(forwarded) > room - room // 4:
        cut["headers_dropped"] = len(forwarded)
        forwarded = []
    left = room - len(key or b"") - headers_size(forwarded)
    if value is not None and len(value) > left:
        cut |= {"value_bytes": len(value), "value_kept": left, "value_sha256": hashlib.sha256(value).hexdigest()}
        value = value[:left]
    return key, value, forwarded, cut
