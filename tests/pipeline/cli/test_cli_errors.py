"""The command line a new user meets (issue 16's measured problems): every user error is one line on stderr naming
the problem and the fix, exit 2, no traceback; every flag's help shows its default; the model and the arguments are
checked before any broker is contacted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from liquidstream.pipeline.cli import entry
from liquidstream.pipeline.cli.args import DefaultsFormatter
from liquidstream.pipeline.cli.entry import build_parser, main

T0 = 1_767_225_600_000


def _readings(path: Path, channels: int, n: int = 40, extra: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps({"device_id": f"d{k % 2}", "ts": T0 + 1000 * k, "values": [1.0 + 0.1 * (k % 3)] * channels})
             for k in range(n)]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"liquidstream {argv[0]}: error: "), err
    for word in words:
        assert word in last, last
    return last


def test_missing_input_existing_out_file_and_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fails(["replay", "--input", "missing.jsonl", "--out", "o", "--quiet"], capsys, "missing.jsonl: no such file")
    src = _readings(tmp_path / "r.jsonl", 2)
    (tmp_path / "afile").write_text("x")
    _fails(["replay", "--input", str(src), "--out", "afile", "--quiet"], capsys, "--out afile: is a file",
           "give a folder")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(["replay", "--input", str(src), "--out", "o", "--device", "cuda", "--quiet"], capsys,
           "no CUDA GPU", "--device cpu")
    _fails(["train", "--input", "missing.jsonl", "--out", "m.pt", "--quiet"], capsys, "no such file")
    _fails(["demo", "--out", "afile", "--quiet"], capsys, "--out afile: is a file")


def test_a_garbage_model_names_the_flag_and_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _readings(tmp_path / "r.jsonl", 2)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    _fails(["replay", "--input", str(src), "--out", str(tmp_path / "o"), "--model", str(junk), "--quiet"], capsys,
           f"--model {junk}", "liquidstream train")
    (tmp_path / "junk.json").write_text('{"format": 1, "version": null, "model": {"n_channels": 2}}')
    _fails(["replay", "--input", str(src), "--out", str(tmp_path / "o"), "--model", str(junk), "--quiet"], capsys,
           "not a model saved by liquidstream", "liquidstream train")


def test_run_checks_its_model_before_any_connection(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from liquidstream.pipeline.ops import health

    def no_broker(*_: Any, **__: Any) -> None:
        raise AssertionError("connected to a broker before checking the model")

    monkeypatch.setattr(health, "preflight", no_broker)
    _fails(["run", "--model", str(tmp_path / "missing.pt"), "--bootstrap", "127.0.0.1:1"], capsys,
           "missing.pt: no such file")
    _fails(["run", "--shape", "long", "--channel-fields", "a,b,c", "--model", str(tmp_path / "missing.pt")], capsys,
           "missing.pt: no such file")  # the long shape is read from a topic, its model still checked first
    monkeypatch.setenv("LIQUIDSTREAM_MODEL_SIGNING_KEY", "0123456789abcdef0123")
    _fails(["train-worker", "--model", str(tmp_path / "missing.pt"), "--bootstrap", "127.0.0.1:1"], capsys,
           "missing.pt: no such file")


def test_bad_arguments_and_settings_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as info:
        main(["replay", "--input", "x", "--out", "o", "--train-fraction", "2"])
    assert info.value.code == 2 and "--train-fraction: must be a fraction in [0, 1], got 2" in capsys.readouterr().err
    monkeypatch.setenv("LIQUIDSTREAM_OPERATOR__MAX_GAP_S", "-3")
    assert main(["schema", "reading"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LIQUIDSTREAM_OPERATOR: max_gap_s must be > 0" in err


def test_nothing_valid_exits_2_and_train_reports_skipped_lines(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    three = _readings(tmp_path / "three.jsonl", 3)
    four = _readings(tmp_path / "four.jsonl", 4, extra=("garbage", '{"device_id": "d9", "ts": 1, "values": [1]}'))
    model = tmp_path / "m.pt"
    assert main(["train", "--input", str(four), "--out", str(model), "--epochs", "1", "--hidden-size", "4",
                 "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["skipped"] == 2
    assert "skipped 2 invalid line(s)" in err and "malformed_json" in err and "wrong_length" in err
    last = _fails(["replay", "--input", str(three), "--out", str(tmp_path / "o"), "--model", str(model), "--quiet"],
                  capsys, "no valid reading", "40 wrong_length")
    assert "invalid.jsonl" in last
    _fails(["train", "--input", str(tmp_path / "o" / "invalid.jsonl"), "--out", str(model), "--quiet"], capsys,
           "no valid reading")


def test_replay_without_a_model_warns_and_suggests_train_fraction(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = _readings(tmp_path / "r.jsonl", 2)
    assert main(["replay", "--input", str(src), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "UNTRAINED" in err and "--train-fraction" in err


def test_version_and_every_flag_shows_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("liquidstream ")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        formatter = DefaultsFormatter(name)
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            if not action.help or (action.nargs != 0 and "default" not in text and "required" not in text):
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []
    assert "(default: LIQUIDSTREAM_INPUT_TOPIC, else readings)" in " ".join(sub.choices["run"].format_help().split())


def test_same_flag_names_across_commands_with_old_names_kept() -> None:
    parser = build_parser()
    assert parser.parse_args(["simulate", "--input-topic", "t"]).input_topic == "t"
    assert parser.parse_args(["simulate", "--topic", "t"]).input_topic == "t"  # the old name
    assert entry._settings(parser.parse_args(["simulate", "--topic", "t"])).input_topic == "t"


def test_simulate_out_writes_the_readings_train_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "readings.jsonl"
    assert main(["simulate", "--out", str(out), "--out-only", "--devices", "3", "--events", "60"]) == 0
    assert json.loads(capsys.readouterr().out)["readings"] == 60
    assert len(out.read_text().splitlines()) == 60
    assert main(["train", "--input", str(out), "--out", str(tmp_path / "m.pt"), "--epochs", "1",
                 "--hidden-size", "4", "--quiet"]) == 0
    _fails(["simulate", "--out-only"], capsys, "--out-only needs --out")


def test_replay_and_report_accept_and_reject_the_same_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _readings(tmp_path / "r.jsonl", 2, extra=("garbage", '{"device_id": "d0", "ts": "soon", "values": [1, 2]}'))
    out = tmp_path / "o"
    assert main(["replay", "--input", str(src), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    invalid = len((out / "invalid.jsonl").read_text().splitlines())
    assert main(["report", "--readings", str(src), "--predictions", str(out / "predictions.jsonl"), "--alerts",
                 str(out / "alerts.jsonl"), "--out", str(tmp_path / "r.png")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_readings"] == invalid == 2
