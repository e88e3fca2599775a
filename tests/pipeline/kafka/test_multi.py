"""Several models in one worker (liquidstream.pipeline.kafka.multi): per-topic settings, the runner, the CLI."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from liquidstream.operators import Forecaster
from liquidstream.operators.model_io import save_model
from liquidstream.pipeline.cli.entry import main
from liquidstream.pipeline.kafka.multi import MultiModelWorker, topic_settings
from liquidstream.pipeline.kafka.transactions import transactional_id
from liquidstream.pipeline.settings import Settings


def test_each_topic_gets_its_own_group_changelog_transactions_lineage_and_mapping() -> None:
    wide = {"shape": "wide", "channel_fields": ["t", "p", "v"]}
    s = Settings(group_id="g", models={"b": "b.pt", "a": "a.pt"}, mappings={"b": wide}, metrics_port=0,
                 transactional_id_prefix="tx", model_lineage="lin", changelog_topic="shared-would-collide")
    a, b = topic_settings(s, "w")
    got = (a.input_topic, a.group_id, a.changelog, a.model_lineage, a.metrics_port)
    assert got == ("a", "g.a", "g.a-state-changelog", "lin.a", 0)
    assert transactional_id(a, a.worker_id or "") == "tx.a-w.a" != transactional_id(b, b.worker_id or "")
    assert a.mapping.shape == "reading" and b.mapping.channel_fields == ("t", "p", "v")
    assert a.models == {} and b.mappings == {}


class _Fake:
    def __init__(self, code: int, wait: bool) -> None:
        self.code, self.stopped = code, threading.Event()
        if not wait:
            self.stopped.set()

    def run(self) -> int:
        assert self.stopped.wait(10), "never stopped"
        return self.code

    def stop(self, signum: int | None = None, _frame: object = None) -> None:
        self.stopped.set()


def test_a_failing_worker_stops_the_others_and_sets_the_exit_code() -> None:
    waiting, failing = _Fake(0, wait=True), _Fake(2, wait=False)
    runner = MultiModelWorker([waiting, failing], ["a", "b"])
    assert runner.run() == 2
    assert runner.codes == {"a": 0, "b": 2}
    clean = MultiModelWorker([_Fake(0, wait=True), _Fake(0, wait=True)], ["a", "b"])
    threading.Timer(0.2, clean.stop).start()  # SIGTERM: every worker finishes and exits 0
    assert clean.run() == 0


def test_run_checks_every_model_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from liquidstream.pipeline.ops import health

    def no_broker(*_: Any, **__: Any) -> None:
        raise AssertionError("connected before checking the models")

    monkeypatch.setattr(health, "preflight", no_broker)
    good = tmp_path / "good.pt"
    save_model(Forecaster(n_channels=2, hidden_size=4), good)
    assert main(["run", "--models", f"a={good},b={tmp_path / 'missing.pt'}"]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    assert main(["run", "--models", f"a={good}", "--model", str(good)]) == 2
    assert "give one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--models", "a"])
    assert "TOPIC=MODEL" in capsys.readouterr().err
