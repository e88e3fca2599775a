"""liquidstream.pipeline.eval: accuracy, measured against public benchmarks and published peers.

Contract: each ``liquidstream evaluate`` benchmark streams its data through the operator in time order with
no look-ahead and prints its figures next to the published ones: NAB (:mod:`~liquidstream.pipeline.eval.nab_eval`,
scored by :mod:`~liquidstream.pipeline.eval.nab_scoring`) and SKAB, sharing one harness with the ablations
(:mod:`~liquidstream.pipeline.eval.detection`); SKAB (:mod:`~liquidstream.pipeline.eval.skab`,
:mod:`~liquidstream.pipeline.eval.skab_eval`, River peers in :mod:`~liquidstream.pipeline.eval.peers`), the
irregular-sampling study (:mod:`liquidstream.pipeline.eval.irregular`), the demo's incident scoring
(:mod:`~liquidstream.pipeline.eval.incidents`) and the online learner's poisoning scenario
(:mod:`~liquidstream.pipeline.eval.poisoning`).  Data folders are arguments; nothing is copied.
"""

__all__ = ["detection", "incidents", "irregular", "nab_eval", "nab_scoring", "peers", "poisoning", "skab", "skab_eval"]
