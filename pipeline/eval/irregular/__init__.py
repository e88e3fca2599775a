"""liquidstream.pipeline.eval.irregular: does the real time gap help the forecast? (``docs/evaluation.md``)

Contract: :mod:`~liquidstream.pipeline.eval.irregular.study` trains the cells and their gap-blind twins on
real irregular recordings and the simulator (:mod:`~liquidstream.pipeline.eval.irregular.data`), scores them
per gap bin (:mod:`~liquidstream.pipeline.eval.irregular.bins`) against peers
(:mod:`~liquidstream.pipeline.eval.irregular.peers`) and a reference that measures what each stream allows
(:mod:`~liquidstream.pipeline.eval.irregular.reference`).
"""

__all__ = ["bins", "data", "models", "peers", "reference", "study"]
