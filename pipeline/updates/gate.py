"""What a process may adopt from the model-updates topic: :class:`UpdateGate`.

A record must be signed with this process's key, of its lineage, with a ``seq`` above the model it serves (an
older record replayed is *stale*), of the same architecture, and decode to weights that hash to the version
it claims.  Used by the serving worker's follower and by the trainer at start-up.

>>> import torch
>>> from liquidstream.operators.forecaster import Forecaster
>>> from liquidstream.pipeline.updates.record import build_record
>>> torch.manual_seed(0) and None
>>> served = Forecaster(n_channels=2, hidden_size=4, cell="liquid")
>>> gate = UpdateGate(b"k" * 16, "demo")
>>> rec = build_record(served.state_dict(), served.config(), seq=3, lineage="demo", signing_key=b"k" * 16)
>>> gate.adopt(gate.screen(rec.value, rec.headers, served)).seq, gate.seq
(3, 3)
>>> gate.screen(rec.value, rec.headers, served)
Traceback (most recent call last):
...
liquidstream.pipeline.updates.record.UpdateRejected: model update rejected (stale): seq 3 is not above the served seq 3
"""

from __future__ import annotations

from liquidstream.operators.forecaster import Forecaster
from liquidstream.pipeline.updates.record import (
    Envelope,
    ModelUpdate,
    RejectReason,
    UpdateRejected,
    check_compatible,
    decode,
    verify,
)
from liquidstream.pipeline.wire.types import HeadersLike

__all__ = ["UpdateGate"]


class UpdateGate:
    """Signature, lineage, order and architecture checks, and the ``seq`` of the model being served
    (0: a model from a file, which any valid update of the lineage supersedes)."""

    def __init__(self, key: bytes | None, lineage: str, seq: int = 0) -> None:
        self.key, self.lineage, self.seq = key, lineage, seq

    def screen(self, value: bytes | None, headers: HeadersLike, serving: Forecaster | None) -> Envelope:
        """Everything short of decoding the weights (``serving`` None: any architecture)."""
        env = verify(value, headers, self.key)
        if env.lineage != self.lineage:
            raise UpdateRejected(RejectReason.OTHER_LINEAGE, f"lineage {env.lineage!r}, following {self.lineage!r}")
        if env.seq <= self.seq:
            raise UpdateRejected(RejectReason.STALE, f"seq {env.seq} is not above the served seq {self.seq}")
        if serving is not None:
            check_compatible(env, serving)
        return env

    def adopt(self, envelope: Envelope) -> ModelUpdate:
        """Decode a screened envelope; on success its seq becomes the served one."""
        update = decode(envelope)
        self.seq = update.seq
        return update
