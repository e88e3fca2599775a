"""liquidstream.pipeline.wire: what goes over Kafka, in and out, and nothing that talks to a broker.

Contract: :mod:`~liquidstream.pipeline.wire.schemas` is the input reading and the dead-letter reasons,
:mod:`~liquidstream.pipeline.wire.contract` the published output records (``liquidstream schema``);
:func:`decode_batch` turns message values into one columnar batch plus a reject, with its reason, for every message
it could not use (:mod:`~liquidstream.pipeline.wire.checks` holds the reading checks, ``mapping``/``reshape``/
``assembly`` read other JSON shapes); :mod:`~liquidstream.pipeline.wire.records` and
:mod:`~liquidstream.pipeline.wire.encode` make prediction and alert records; :class:`DeadLetter` carries an unusable
message with its reason and source coordinates; :mod:`~liquidstream.pipeline.wire.types` holds every shared message
and type alias.
"""

from liquidstream.pipeline.wire.codec import DecodedBatch, decode_batch
from liquidstream.pipeline.wire.dead_letters import DeadLetter
from liquidstream.pipeline.wire.records import alert_records, encode_predictions, prediction_records

__all__ = ["DeadLetter", "DecodedBatch", "alert_records", "decode_batch", "encode_predictions", "prediction_records"]
