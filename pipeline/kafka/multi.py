"""Several models in one worker process: one input topic per model, each with its own channel count and mapping.

``LIQUIDSTREAM_MODELS='{"line-a": "a.pt", "line-b": "b.pt"}'`` (or ``run --models line-a=a.pt,line-b=b.pt``) maps
each input topic to a model; ``LIQUIDSTREAM_MAPPINGS='{"line-b": {"shape": "wide", ...}}'`` gives a topic its own
input mapping (default: ``mapping``).  Each topic runs as a complete :class:`KafkaWorker` of its own in a thread of
this process: its own consumer group ``<group_id>.<topic>``, state changelog (``<group_id>.<topic>-state-changelog``),
transactional id, model-update lineage ``<model_lineage>.<topic>`` and ops port (``metrics_port + i`` for the
``i``-th topic in sorted order; 0 stays 0).  So every guarantee of the single-model worker holds per topic, unchanged:
nothing is shared but the process and the output topics (records carry their model's ``model_version``).  A
device-type field choosing the model within one topic is not supported.

>>> s = Settings(group_id="plant", models={"line-b": "b.pt", "line-a": "a.pt"}, metrics_port=9108)
>>> [(t.input_topic, t.group_id, str(t.model), t.metrics_port, t.changelog) for t in topic_settings(s, "w1")]
... # doctest: +NORMALIZE_WHITESPACE
[('line-a', 'plant.line-a', 'a.pt', 9108, 'plant.line-a-state-changelog'),
 ('line-b', 'plant.line-b', 'b.pt', 9109, 'plant.line-b-state-changelog')]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from liquidstream.pipeline.settings import Settings

__all__ = ["MultiModelWorker", "topic_settings"]
log = logging.getLogger("liquidstream.worker")


class Runnable(Protocol):
    """What :class:`MultiModelWorker` runs: a :class:`~liquidstream.pipeline.kafka.worker.KafkaWorker`."""

    def run(self) -> int: ...

    def stop(self, signum: int | None = None, _frame: object = None) -> None: ...


def topic_settings(settings: Settings, worker_id: str) -> list[Settings]:
    """The settings of each topic's worker, in sorted topic order (see the module docstring)."""
    out = []
    for i, (topic, model) in enumerate(sorted(settings.models.items())):
        prefix = settings.transactional_id_prefix
        out.append(settings.model_copy(update={
            "input_topic": topic, "model": model, "models": {}, "mappings": {},
            "mapping": settings.mappings.get(topic, settings.mapping), "group_id": f"{settings.group_id}.{topic}",
            "changelog_topic": None, "transactional_id_prefix": f"{prefix}.{topic}" if prefix else None,
            "worker_id": f"{worker_id}.{topic}", "model_lineage": f"{settings.model_lineage}.{topic}",
            "metrics_port": settings.metrics_port + i if settings.metrics_port else 0}))
    return out


class MultiModelWorker:
    """Runs one worker per topic in threads until all stop; a worker that fails stops the others."""

    def __init__(self, workers: Sequence[Runnable], names: Sequence[str]) -> None:
        self.workers, self.names = list(workers), list(names)
        self.codes: dict[str, int] = {}

    def stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Signal handler (main thread): every worker finishes its batch, commits it and exits."""
        for worker in self.workers:
            worker.stop(signum)

    def _run_one(self, name: str, worker: Runnable) -> None:
        try:
            code = worker.run()
        except Exception:  # KafkaWorker.run catches its own errors; anything here is a bug
            log.exception("worker for topic %s failed", name)
            code = 1
        self.codes[name] = code
        if code != 0:
            log.error("worker for topic %s exited %d: stopping the other topics' workers", name, code)
            self.stop()

    def run(self) -> int:
        """The highest exit code of the topics' workers (0 when every one stopped cleanly)."""
        threads = [threading.Thread(target=self._run_one, args=(n, w), name=f"worker-{n}", daemon=True)
                   for n, w in zip(self.names, self.workers, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # short joins: the main thread keeps handling SIGTERM / SIGINT
                thread.join(timeout=0.5)
        return max(self.codes.values(), default=0)
