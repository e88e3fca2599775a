"""Every message and type alias shared across the pipeline's sub-packages, in one module.

Nothing here does anything: these are the shapes the Kafka worker, the faust app, the codec, the dead letters
and the model-update records agree on (``confluent_kafka`` itself is not imported, so offline code and tests
can use them without a client).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

__all__ = ["Headers", "HeadersLike", "MessageLike", "SourceCoords", "TopicPart"]

#: (topic, partition) of an input partition.
TopicPart = tuple[str, int]
#: (topic, partition, offset) of the message a record was made from.
SourceCoords = tuple[str, int, int]
#: Headers as this project produces them: ``Producer.produce(headers=...)``.
Headers = list[tuple[str, bytes | None]]
#: Headers as read from any client (confluent-kafka's list of pairs, aiokafka's tuples, a mapping) or none.
HeadersLike = Iterable[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None


class MessageLike(Protocol):
    """The part of ``confluent_kafka.Message`` the batch step reads (a consumed data message)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Any: ...
    def timestamp(self) -> tuple[int, int]: ...  # (timestamp type, epoch ms); type 0: none
