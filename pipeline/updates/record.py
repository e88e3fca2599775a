"""Signed model-update records: the wire format of the compacted ``model-updates`` topic.

One record per accepted model, key = the model *lineage* (UTF-8; compaction keeps the latest per lineage),
value = ``MAGIC | header length (uint32, big-endian) | header (UTF-8 JSON) | weights (safetensors)``:

* the header holds ``format``, ``lineage``, ``version`` (content hash of the weights, as
  :func:`liquidstream.operators.model_io.model_version`), ``seq`` (integer, +1 per published model of a lineage),
  ``parent_version``, ``model`` (``Forecaster.config()``), ``validation`` figures, ``created_at_ms`` (epoch
  ms) and ``trainer`` (id of the publishing trainer);
* the weights are a ``safetensors`` blob: raw tensors behind a JSON index, so loading never unpickles.

Kafka header ``ls.model.signature`` carries ``hex(HMAC-SHA256(key, DOMAIN + value))``; ``ls.model.version``
and ``ls.model.seq`` repeat header fields for people reading the topic (never trusted).  Checks, cheapest
first (:func:`verify` on the raw bytes before anything is parsed, then :func:`decode`), each failure an
:class:`UpdateRejected` with a :class:`RejectReason`.

>>> import torch
>>> from liquidstream.operators.forecaster import Forecaster
>>> torch.manual_seed(0) and None
>>> m = Forecaster(n_channels=2, hidden_size=4, cell="liquid")
>>> rec = build_record(m.state_dict(), m.config(), seq=1, lineage="demo", signing_key=b"k" * 16)
>>> update = decode(verify(rec.value, rec.headers, b"k" * 16))
>>> update.seq, update.version == rec.version, update.model.hidden_size
(1, True, 4)
>>> verify(rec.value, rec.headers, b"x" * 16)
Traceback (most recent call last):
...
liquidstream.pipeline.updates.record.UpdateRejected: model update rejected (bad_signature): HMAC-SHA256 does not match
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from pydantic import SecretStr
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from liquidstream.operators.forecaster import Forecaster
from liquidstream.operators.model_io import model_version
from liquidstream.pipeline.errors import ConfigurationError, PipelineError
from liquidstream.pipeline.wire.types import HeadersLike

MAGIC = b"LSMODEL1"
FORMAT = 1
DOMAIN = b"liquidstream/model-update/v1\x00"  # HMAC domain separation: a MAC of other data never verifies here
H_SIGNATURE, H_VERSION, H_SEQ = "ls.model.signature", "ls.model.version", "ls.model.seq"
MIN_KEY_BYTES = 16
MAX_HEADER_BYTES = 64 * 1024
#: A record larger than this is refused unread (the topic is created with this ``max.message.bytes``).
MAX_RECORD_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct(">I")
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int, "lineage": str, "version": str, "seq": int, "parent_version": (str, type(None)),
    "model": dict, "validation": dict, "created_at_ms": int, "trainer": str}
#: Architecture fields that must equal the serving model's for its device state to stay meaningful.
COMPAT_FIELDS = ("n_channels", "hidden_size", "cell")
#: Kafka record headers as confluent-kafka hands them out (a list of pairs) or as a mapping.


class RejectReason(StrEnum):
    UNSIGNED = "unsigned"  # no signature header
    NO_KEY = "no_key"  # this process has no signing key: it adopts nothing
    BAD_SIGNATURE = "bad_signature"  # the MAC does not match: forged, or any byte changed
    MALFORMED = "malformed"  # signed, but not a decodable record (or not one this code understands)
    TAMPERED = "tampered"  # signed, but the weights do not hash to the version it claims
    STALE = "stale"  # seq not above the model being served: an old record replayed
    INCOMPATIBLE = "incompatible"  # another architecture than the serving model's
    OTHER_LINEAGE = "other_lineage"  # a record of another model lineage (not an error: ignored)


class UpdateRejected(PipelineError):
    """A model-update record that must not be adopted; ``reason`` is the metric label."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"model update rejected ({reason.value}): {detail}")


def signing_key(secret: SecretStr | None) -> bytes | None:
    """The HMAC key bytes of a ``model_signing_key`` setting; a short key is a configuration error."""
    if secret is None:
        return None
    key = secret.get_secret_value().encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        msg = f"LIQUIDSTREAM_MODEL_SIGNING_KEY must be at least {MIN_KEY_BYTES} bytes (got {len(key)})"
        raise ConfigurationError(msg)
    return key


def sign(value: bytes, key: bytes) -> str:
    return hmac.new(key, DOMAIN + value, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class UpdateRecord:
    """One record to produce: key, value and headers, plus the fields a publisher logs."""

    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    version: str
    seq: int


@dataclass(frozen=True)
class Envelope:
    """A record whose signature verified: its parsed header and its (not yet decoded) weight bytes."""

    header: dict[str, Any]
    weights: bytes

    @property
    def seq(self) -> int:
        return int(self.header["seq"])

    @property
    def lineage(self) -> str:
        return str(self.header["lineage"])


@dataclass(frozen=True)
class ModelUpdate:
    """A verified, decoded update: the model it describes and its lineage bookkeeping."""

    model: Forecaster
    version: str
    seq: int
    parent_version: str | None
    lineage: str
    validation: dict[str, float]
    created_at_ms: int
    trainer: str


def build_record(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, seq: int, lineage: str,
                 signing_key: bytes | None, parent_version: str | None = None,
                 validation: Mapping[str, float] | None = None, trainer: str = "",
                 created_at_ms: int | None = None) -> UpdateRecord:
    """Encode (and sign, unless ``signing_key`` is None) one update; the version is computed here."""
    model = Forecaster.from_config(config)
    model.load_state_dict(dict(state_dict))
    version = model_version(model)
    weights = st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    header = {"format": FORMAT, "lineage": lineage, "version": version, "seq": int(seq),
              "parent_version": parent_version, "model": model.config(),
              "validation": {k: float(v) for k, v in (validation or {}).items()},
              "created_at_ms": int(created_at_ms if created_at_ms is not None else time.time_ns() // 1_000_000),
              "trainer": trainer}
    head = json.dumps(header, sort_keys=True, allow_nan=True).encode("utf-8")
    value = MAGIC + _LEN.pack(len(head)) + head + weights
    headers = [(H_VERSION, version.encode()), (H_SEQ, str(seq).encode())]
    if signing_key is not None:
        headers.insert(0, (H_SIGNATURE, sign(value, signing_key).encode()))
    return UpdateRecord(lineage.encode("utf-8"), value, headers, version, int(seq))


def header_value(headers: HeadersLike, name: str) -> bytes | None:
    """The value of header ``name`` (the last one wins, as in a mapping), in a list or a mapping."""
    found = None
    for k, v in (headers.items() if isinstance(headers, Mapping) else headers or ()):
        if k == name:
            found = v.encode() if isinstance(v, str) else v
    return found


def verify(value: bytes | None, headers: HeadersLike, key: bytes | None) -> Envelope:
    """Check the signature over the raw bytes, then parse the header; raises :class:`UpdateRejected`."""
    given = header_value(headers, H_SIGNATURE)
    if given is None:
        raise UpdateRejected(RejectReason.UNSIGNED, "no ls.model.signature header")
    if key is None:
        raise UpdateRejected(RejectReason.NO_KEY, "no signing key configured: updates cannot be verified")
    if value is None or len(value) > MAX_RECORD_BYTES:
        raise UpdateRejected(RejectReason.MALFORMED, f"value is {'null' if value is None else 'too large'}")
    if not hmac.compare_digest(sign(value, key).encode(), given):
        raise UpdateRejected(RejectReason.BAD_SIGNATURE, "HMAC-SHA256 does not match")
    return _parse(value)


def _parse(value: bytes) -> Envelope:
    if len(value) < len(MAGIC) + _LEN.size or not value.startswith(MAGIC):
        raise UpdateRejected(RejectReason.MALFORMED, "not a liquidstream model-update record (magic)")
    (hlen,) = _LEN.unpack_from(value, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > min(MAX_HEADER_BYTES, len(value) - start):
        raise UpdateRejected(RejectReason.MALFORMED, f"header length {hlen} out of range")
    try:
        header = json.loads(value[start:start + hlen])
    except ValueError as ex:
        raise UpdateRejected(RejectReason.MALFORMED, f"header is not JSON: {ex}") from ex
    if not isinstance(header, dict):
        raise UpdateRejected(RejectReason.MALFORMED, "header is not a JSON object")
    bad = [k for k, t in _FIELDS.items() if not isinstance(header.get(k, ...), t)]
    if not bad and not all(isinstance(v, int | float) for v in header["validation"].values()):
        bad = ["validation"]
    if bad or header["format"] != FORMAT:
        raise UpdateRejected(RejectReason.MALFORMED, f"header fields missing or mistyped: {bad or ['format']}")
    return Envelope(header, value[start + hlen:])


def check_compatible(envelope: Envelope, serving: Forecaster) -> None:
    """The update's architecture keeps the serving model's (``COMPAT_FIELDS``), else INCOMPATIBLE."""
    cfg, have = envelope.header["model"], serving.config()
    diff = {k: (cfg.get(k), have[k]) for k in COMPAT_FIELDS if cfg.get(k) != have[k]}
    if diff:
        detail = ", ".join(f"{k} {new!r} (serving {old!r})" for k, (new, old) in diff.items())
        raise UpdateRejected(RejectReason.INCOMPATIBLE, f"seq {envelope.seq}: {detail}")


def decode(envelope: Envelope) -> ModelUpdate:
    """Rebuild the model of a verified envelope (safetensors only; no pickle) and check its version hash."""
    h = envelope.header
    try:
        tensors = st_load(envelope.weights)
        model = Forecaster.from_config(h["model"])
        model.load_state_dict(tensors, strict=True)
    # safetensors raises SafetensorError (a bare Exception) on bad bytes; TypeError, ConfigError or
    # RuntimeError (load_state_dict) come from a config or a tensor set that does not fit
    except Exception as ex:
        raise UpdateRejected(RejectReason.MALFORMED, f"seq {h['seq']}: weights do not load: {ex}") from ex
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
        raise UpdateRejected(RejectReason.MALFORMED, f"seq {h['seq']}: non-finite weights")
    version = model_version(model)
    if version != h["version"]:
        raise UpdateRejected(RejectReason.TAMPERED, f"seq {h['seq']}: weights hash to {version}, "
                                                    f"header says {h['version']}")
    return ModelUpdate(model.eval(), version, int(h["seq"]), h["parent_version"], str(h["lineage"]),
                       {str(k): float(v) for k, v in h["validation"].items()}, int(h["created_at_ms"]),
                       str(h["trainer"]))
