"""``liquidstream train-worker``: fine-tune the forecaster on the live readings and publish signed updates.

The trainer reads the input topic in its own consumer group (``trainer_group_id``, default ``<group_id>-trainer``;
at-least-once is plenty, it only learns), decodes each batch with the worker's columnar codec (rejects are counted and
skipped: the serving workers dead-letter them) and feeds :meth:`OnlineLearner.observe
<liquidstream.operators.online.learner.OnlineLearner.observe>`.  Every ``trainer_interval_s`` in which new readings
arrived it first asks for a rollback (live error up since the last swap), else trains a candidate
(:meth:`~liquidstream.operators.online.learner.OnlineLearner.learn`, the guards decide); an accepted model or a rollback
is signed, published to ``model_updates_topic`` with the next ``seq`` (one transaction, acknowledged before going on),
and only then adopted by the learner.  Offsets are committed at each attempt and at shutdown.

One trainer per lineage, enforced by Kafka: the publisher's transactional id is the lineage's
(:mod:`liquidstream.pipeline.updates.publisher`), so a newer trainer fences this one, whose next publish raises
:class:`~liquidstream.pipeline.errors.TrainerFenced`: it adopts nothing, leaves the offsets read since its last commit
uncommitted (their model is discarded) and exits :data:`EXIT_FENCED`.  SIGTERM/SIGINT finish the current
step and exit 0; the last stdout line is a JSON summary, like ``liquidstream run``'s.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from liquidstream.operators.forecaster import Forecaster
from liquidstream.pipeline.errors import PipelineError, TrainerFenced
from liquidstream.pipeline.kafka.batch_step import coords, offsets_to_commit
from liquidstream.pipeline.kafka.long_input import StreamAssembly
from liquidstream.pipeline.kafka.transactions import consumer_config
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.updates.publisher import UpdatePublisher
from liquidstream.pipeline.updates.record import build_record
from liquidstream.pipeline.wire.codec import DecodeLimits, decode_batch
from liquidstream.pipeline.wire.types import TopicPart

__all__ = ["EXIT_FENCED", "Decision", "Learner", "TrainWorker", "TrainerStats"]
log = logging.getLogger("liquidstream.trainer")
STATS_EVERY_S = 10.0  # seconds between periodic stats lines
EXIT_FENCED = 3  # exit code of a trainer fenced by a newer one of its lineage (2: other errors, 1: a bug)


class Decision(Protocol):
    """What :meth:`Learner.learn` returns (:class:`liquidstream.operators.online.learner.UpdateDecision`)."""

    @property
    def accepted(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def state_dict(self) -> dict[str, torch.Tensor] | None: ...
    @property
    def figures(self) -> dict[str, float]: ...


class Learner(Protocol):
    """The part of :class:`liquidstream.operators.online.learner.OnlineLearner` the trainer drives."""

    @property
    def model(self) -> Forecaster: ...
    @property
    def version(self) -> str: ...
    @property
    def buffer_windows(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    def observe(self, device_ids: Sequence[str], ts_ms: np.ndarray, values: np.ndarray) -> object: ...
    def learn(self) -> Decision: ...
    def adopt(self, state_dict: dict[str, torch.Tensor], version: str) -> None: ...
    def check_rollback(self) -> Decision | None: ...


@dataclass
class TrainerStats:
    consumed: int = 0  # input messages
    observed: int = 0  # valid readings handed to the learner
    rejected: int = 0  # messages the codec refused (the serving workers dead-letter them)
    batches: int = 0
    decisions: Counter[str] = field(default_factory=Counter)  # by reason
    published: int = 0  # updates published (accepted candidates and rollbacks)
    busy_s: float = 0.0  # seconds observing and learning
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "observed": self.observed, "rejected": self.rejected,
                "batches": self.batches, "attempts": sum(self.decisions.values()),
                "decisions": dict(sorted(self.decisions.items())), "published": self.published,
                "busy_s": round(self.busy_s, 3), "uptime_s": round(time.monotonic() - self.started, 3)}


class TrainWorker:
    """The trainer's loop; ``consumer``/``publisher`` replace the clients built from ``settings`` (tests)."""

    def __init__(self, settings: Settings, learner: Learner, *, seq: int, signing_key: bytes, worker_id: str,
                 consumer: Consumer | None = None, publisher: UpdatePublisher | None = None,
                 metrics: Metrics | None = None, max_updates: int | None = None,
                 beat: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``seq``: the highest seq of the lineage on the topic, read after ``publisher.start()`` (which
        :meth:`run` calls if the caller has not); ``beat``: liveness, once per loop turn."""
        self.settings, self.learner, self.seq, self.key = settings, learner, seq, signing_key
        self.worker_id, self.max_updates, self.clock = worker_id, max_updates, clock
        self.metrics, self.beat = metrics or Metrics(), beat or (lambda: None)
        self.consumer = consumer or Consumer(consumer_config(settings) | {"group.id": settings.trainer_group})
        self.publisher = publisher or UpdatePublisher(settings)
        self.limits = DecodeLimits.from_settings(settings, learner.model.n_channels)
        # The long shape: channels waiting in memory only (a restart loses a few unfinished readings: training data)
        self.assembly = StreamAssembly(self.limits, round(settings.mapping.assembly_window_s * 1000)) \
            if settings.mapping.shape == "long" else None
        self.stats = TrainerStats()
        self._pending: dict[TopicPart, int] = {}  # offsets observed, not committed yet
        self._new_readings = 0  # since the last update attempt
        self._stop_reason: str | None = None
        self._last_attempt = self._last_input = self._last_stats = clock()

    def stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Signal handler: finish the current step, commit, exit 0."""
        self._stop_reason = f"signal {signum}" if signum is not None else "stop requested"

    def run(self) -> int:
        s, code = self.settings, 0
        try:
            self.publisher.start()
            self.consumer.subscribe([s.input_topic], on_revoke=self._on_revoke)
            log.info("trainer %s learning from %s as group %s; model %s seq %d; updates to %s (lineage %r) every "
                     "%s s", self.worker_id, s.input_topic, s.trainer_group, self.learner.version, self.seq,
                     s.model_updates_topic, s.model_lineage, s.trainer_interval_s)
            while self._stop_reason is None:
                self.beat()
                messages = self.consumer.consume(num_messages=s.batch_max_messages, timeout=s.batch_max_ms / 1000)
                self._observe(messages)
                now = self.clock()
                if self._new_readings and now - self._last_attempt >= s.trainer_interval_s:
                    self._attempt()
                elif s.exit_when_idle_s is not None and now - self._last_input >= s.exit_when_idle_s:
                    self._stop_reason = f"idle for {s.exit_when_idle_s} s"
                if now - self._last_stats >= STATS_EVERY_S:
                    self._last_stats = now
                    log.info("trainer stats %s", json.dumps(self._summary()))
        except TrainerFenced as ex:
            log.error("trainer stopping: %s", ex)
            self._pending.clear()  # learned into a model nobody will serve: left for the group to read again
            code = EXIT_FENCED
        except (PipelineError, KafkaException) as ex:
            log.error("trainer stopping: %s", ex)
            code = 2
        except Exception:
            log.exception("bug in the trainer; exiting")
            code = 1
        self._close(code)
        return code

    # ------------------------------------------------------------------ steps
    def _observe(self, messages: list[Message]) -> None:
        data = []
        for m in messages:
            err = m.error()
            if err is None:
                data.append(m)
            elif err.fatal():
                msg = f"fatal consumer error on {m.topic()}[{m.partition()}]: {err.str()}"
                raise PipelineError(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error on %s[%s]: %s", m.topic(), m.partition(), err.str())
        if not data:
            return
        t0 = time.monotonic()
        now_ms = time.time_ns() // 1_000_000
        if self.assembly is None:
            decoded = decode_batch([m.value() for m in data], [m.key() for m in data], self.limits, now_ms)
        else:
            decoded, _ = self.assembly.decode(data, [coords(m) for m in data], now_ms)
        if len(decoded):
            self.learner.observe(decoded.device_ids, decoded.ts_ms, decoded.values)
        self.stats.consumed += len(data)
        self.stats.observed += len(decoded)
        self.stats.rejected += len(decoded.rejects)
        self.stats.batches += 1
        self.stats.busy_s += time.monotonic() - t0
        for tp, offset in offsets_to_commit(data).items():
            self._pending[tp] = max(self._pending.get(tp, 0), offset)
        self._new_readings += len(decoded)
        self._last_input = self.clock()

    def _attempt(self) -> None:
        """Roll back if live error rose since the last swap, else train a candidate; publish what passes."""
        t0 = time.monotonic()
        self._new_readings = 0
        decision = self.learner.check_rollback()
        if decision is None:
            decision = self.learner.learn()
        self.stats.busy_s += time.monotonic() - t0
        self.stats.decisions[decision.reason] += 1
        self.metrics.trainer_decision(decision.reason, self.learner.buffer_windows)
        figures = {k: round(v, 6) for k, v in decision.figures.items()}
        if decision.state_dict is not None and (decision.accepted or decision.reason == "rollback"):
            self._publish(decision.state_dict, decision.reason, figures)
        else:
            log.info("candidate not published: %s %s", decision.reason, json.dumps(figures))
        self._commit()
        self._last_attempt = self.clock()

    def _publish(self, state_dict: dict[str, torch.Tensor], reason: str, figures: dict[str, float]) -> None:
        """Sign and publish, wait for the broker, then adopt: a model nobody can fetch is never served here."""
        parent = self.learner.version
        record = build_record(state_dict, self.learner.model.config(), seq=self.seq + 1,
                              lineage=self.settings.model_lineage, signing_key=self.key, parent_version=parent,
                              validation=figures | {"rollback": float(reason == "rollback")}, trainer=self.worker_id)
        self.publisher.publish(record)
        self.seq = record.seq
        self.learner.adopt(state_dict, record.version)
        self.stats.published += 1
        log.info("%s: model seq %d version %s (parent %s) %s", reason, record.seq, record.version, parent,
                 json.dumps(figures))
        if self.max_updates is not None and self.stats.published >= self.max_updates:
            self._stop_reason = f"published {self.stats.published} update(s) (--max-updates)"

    def _commit(self) -> None:
        if not self._pending:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(self._pending.items())]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self._pending.clear()
        except KafkaException as ex:  # the trainer only learns: a later commit covers these offsets
            log.warning("offset commit deferred: %s", ex)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit()
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._pending = {tp: o for tp, o in self._pending.items() if tp not in gone}
        if self.assembly is not None:
            self.assembly.drop(gone)

    # ------------------------------------------------------------------ shutdown
    def _summary(self) -> dict[str, Any]:
        return self.stats.as_dict() | {"seq": self.seq, "version": self.learner.version,
                                       "buffer_windows": self.learner.buffer_windows,
                                       "memory_bytes": self.learner.memory_bytes}

    def _close(self, code: int) -> None:
        log.info("trainer shutting down (%s)", self._stop_reason or f"exit code {code}")
        self._commit()
        self.publisher.close()
        try:
            self.consumer.close()
        except KafkaException as ex:
            log.error("consumer close failed: %s", ex)
        final = self._summary() | {"final": True, "exit_code": code, "trainer": self.worker_id,
                                   "lineage": self.settings.model_lineage}
        log.info("final stats %s", json.dumps(final))
        print(json.dumps(final), flush=True)  # stdout: one JSON line, for scripts and tests
