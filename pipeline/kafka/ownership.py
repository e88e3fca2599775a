"""Which input partition a device's readings land on: the producers' partitioner, recomputed.

Kafka state is partitioned by key (as in Kafka Streams' interactive queries): a worker holds only the devices of
the partitions assigned to it.  To tell a caller *where* a device it does not hold lives, the worker hashes the
key as the input topic's producers do (``Settings.input_partitioner``):

* ``consistent_random``, librdkafka's default (every confluent-kafka producer, this project's simulator
  included): CRC-32 of the key bytes, modulo the partition count;
* ``murmur2_random``, the Java client's default (``Utils.toPositive(Utils.murmur2(key)) % partitions``).

>>> partition_for(b"pump-7", 4, "consistent_random"), partition_for(b"pump-7", 4, "murmur2_random")
(3, 0)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

__all__ = ["PARTITIONERS", "murmur2", "partition_for"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 (seed 0x9747b28c), as a signed int like Java's ``Utils.murmur2``.

    >>> murmur2(b"21"), murmur2(b"foobar"), murmur2(b"abc")  # Kafka's own test vectors (UtilsTest)
    (-973932308, -790332482, 479470107)
    """
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    n4 = length // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = data[4 * n4:]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def _crc32(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions


def _murmur2(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions  # Utils.toPositive


#: ``Settings.input_partitioner`` value -> ``(key bytes, partition count) -> partition``.
PARTITIONERS: dict[str, Callable[[bytes, int], int]] = {"consistent_random": _crc32, "murmur2_random": _murmur2}


def partition_for(key: bytes, partitions: int, partitioner: str) -> int:
    """The partition ``partitioner`` puts ``key`` on, among ``partitions`` (>= 1)."""
    return PARTITIONERS[partitioner](key, partitions)
