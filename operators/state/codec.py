"""Binary snapshot format of device state: versioned, self-describing, no pickle.

Layout (all integers little-endian)::

    magic  b"LSSTATE\\0"                       8 bytes
    format version                            uint16   (FORMAT_VERSION)
    header length n                           uint32
    header                                    n bytes of UTF-8 JSON:
        {"hidden_size": H, "n_channels": C, "devices": [ids...],
         "fields": [[name, numpy dtype string, [shape...]], ...]}
    field arrays, in header order             raw C-order little-endian bytes

A reader rejects unknown versions, a different H or C, and missing or mistyped fields with
:class:`~liquidstream.operators.errors.StateFormatError`, so a changelog written by an incompatible model never restores
silently into the wrong shapes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from liquidstream.operators.errors import StateFormatError

MAGIC = b"LSSTATE\0"
#: 2: the anomaly-likelihood detector's fields (``d_*``, ``a_*``, ``lik_n``, ``commissioning``, ``alert_age``,
#: ``cooldown``) replaced the adaptive-threshold ones; a version 1 snapshot is refused, not misread.
#: 3: the alert lifecycle's fields (``alert_peak``, ``alert_reason``, ``alert_open_ms``).
FORMAT_VERSION = 4  # 4: the sampling rhythm and silence fields
_PREFIX = struct.Struct("<8sHI")


def encode_snapshot(device_ids: Sequence[str], arrays: Mapping[str, np.ndarray], *, hidden_size: int,
                    n_channels: int) -> bytes:
    """Pack per-device arrays (first axis = device, in ``device_ids`` order) into bytes.

    >>> blob = encode_snapshot(["d1"], {"h": np.zeros((1, 2), np.float32)}, hidden_size=2, n_channels=1)
    >>> blob[:7]
    b'LSSTATE'
    """
    fields = []
    payload = []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr).astype(np.asarray(arr).dtype.newbyteorder("<"), copy=False)
        if a.shape[:1] != (len(device_ids),):
            msg = f"field {name!r} has {a.shape[:1]} rows for {len(device_ids)} devices"
            raise StateFormatError(msg)
        fields.append([name, a.dtype.str, list(a.shape[1:])])
        payload.append(a.tobytes())
    header = json.dumps({"hidden_size": hidden_size, "n_channels": n_channels,
                         "devices": list(device_ids), "fields": fields}).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(payload)


def decode_snapshot(blob: bytes, *, hidden_size: int, n_channels: int,
                    expected: Mapping[str, tuple[np.dtype[np.generic], str]] | None = None,
                    ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Unpack bytes from :func:`encode_snapshot`, checking the layout against what the caller expects.

    ``expected`` maps field name to (dtype, shape kind) with kind ``"H"``, ``"C"`` or ``""`` (scalar).
    """
    try:
        magic, version, hlen = _PREFIX.unpack_from(blob, 0)
        if magic != MAGIC:
            msg = f"not a liquidstream state snapshot (magic {magic!r})"
            raise StateFormatError(msg)
        if version != FORMAT_VERSION:
            msg = f"state snapshot format version {version} is not supported (expected {FORMAT_VERSION})"
            raise StateFormatError(msg)
        header = json.loads(blob[_PREFIX.size:_PREFIX.size + hlen])
        devices = [str(d) for d in header["devices"]]
        fields = header["fields"]
    except (struct.error, ValueError, KeyError, TypeError) as ex:
        if isinstance(ex, StateFormatError):
            raise
        msg = f"corrupt state snapshot header: {ex}"
        raise StateFormatError(msg) from ex
    if header.get("hidden_size") != hidden_size or header.get("n_channels") != n_channels:
        msg = (f"snapshot holds hidden_size={header.get('hidden_size')}, n_channels={header.get('n_channels')};"
               f" this store has {hidden_size}, {n_channels}")
        raise StateFormatError(msg)
    offset = _PREFIX.size + hlen
    arrays: dict[str, np.ndarray] = {}
    n = len(devices)
    for entry in fields:
        try:
            name, dtype_str, shape = entry
            dtype = np.dtype(dtype_str)
            shape = tuple(int(d) for d in shape)
            if dtype.hasobject or any(d < 0 for d in shape):
                raise ValueError("object dtype or negative dimension")  # noqa: EM101
        except (TypeError, ValueError) as ex:
            msg = f"state snapshot has a malformed field entry {entry!r}: {ex}"
            raise StateFormatError(msg) from ex
        count = n * int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(blob):
            msg = f"state snapshot truncated in field {name!r}"
            raise StateFormatError(msg)
        # copy: frombuffer views are read-only, and callers hand them to torch
        arrays[name] = np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape((n, *shape)).copy()
        offset += nbytes
    if offset != len(blob):
        msg = f"state snapshot has {len(blob) - offset} trailing bytes"
        raise StateFormatError(msg)
    for name, (want_dtype, kind) in (expected or {}).items():
        got = arrays.get(name)
        want_shape = {"H": (n, hidden_size), "C": (n, n_channels), "": (n,)}[kind]
        if got is None or got.dtype.newbyteorder("=") != want_dtype.newbyteorder("=") or got.shape != want_shape:
            msg = f"state snapshot field {name!r} missing or mistyped (want {want_dtype} {want_shape})"
            raise StateFormatError(msg)
    return devices, arrays
