"""docs/settings.md is generated from the settings models (liquidstream.pipeline.settings_doc) and kept current;
unknown LIQUIDSTREAM_* variables are named with the closest valid one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from liquidstream.operators.config import OperatorSettings
from liquidstream.pipeline.cli.entry import main
from liquidstream.pipeline.settings import Settings
from liquidstream.pipeline.settings_doc import field_comments, setting_rows, settings_markdown, unknown_variables

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_docs_settings_md_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert DOC.read_text() == settings_markdown(), "docs/settings.md is stale: run `liquidstream settings > " \
                                                   "docs/settings.md`"
    assert main(["settings"]) == 0
    assert capsys.readouterr().out == settings_markdown()


def test_every_setting_and_operator_knob_has_a_row_with_a_meaning() -> None:
    """Read from the classes at test time: a knob added to OperatorSettings (or Settings) appears by itself."""
    rows = {r.variable: r for r in setting_rows()}
    knobs = [f.name for f in dataclasses.fields(OperatorSettings)]
    for knob in knobs:
        assert f"LIQUIDSTREAM_OPERATOR__{knob.upper()}" in rows
    flat = [n for n, f in Settings.model_fields.items() if n not in ("operator", "online", "mapping")]
    for name in flat:
        assert f"LIQUIDSTREAM_{name.upper()}" in rows
    assert [v for v, r in rows.items() if not r.meaning] == []
    assert rows["LIQUIDSTREAM_OPERATOR__MAX_GAP_S"].unit == "s"
    assert rows["LIQUIDSTREAM_OPERATOR__MAX_GAP_S"].default == f"`{OperatorSettings().max_gap_s}`"
    assert rows["LIQUIDSTREAM_MAPPING__TIME_UNIT"].type == "'ms' \\| 's' \\| 'iso8601'"


def test_field_comments_read_blocks_and_groups() -> None:
    class Example:
        #: The first knob.
        first: int = 1
        second: int = 2  # trailing words

        #: A group naming ``fourth``.
        third: int = 3
        fourth: int = 4
        fifth: int = 5

    comments = field_comments(Example)
    assert comments == {"first": "The first knob.", "second": "trailing words", "third": "A group naming ``fourth``.",
                        "fourth": "see `third`"}


def test_unknown_variables_warn_with_the_closest_name(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert unknown_variables({"LIQUIDSTREAM_OPERATOR__ALERT_PROBABILTY": "1e-5", "LIQUIDSTREAM_OPERATOR": "{}",
                              "LIQUIDSTREAM_TS_MIN_MS": "0", "HOME": "/"}) == [
        "LIQUIDSTREAM_OPERATOR__ALERT_PROBABILTY is not a setting and is ignored; did you mean "
        "LIQUIDSTREAM_OPERATOR__ALERT_PROBABILITY?"]
    monkeypatch.setenv("LIQUIDSTREAM_BOOTSTRAP_SERVERS", "kafka:9092")
    assert main(["schema", "reading"]) == 0
    assert capsys.readouterr().err == ("liquidstream schema: warning: LIQUIDSTREAM_BOOTSTRAP_SERVERS is not a setting "
                                       "and is ignored; did you mean LIQUIDSTREAM_BOOTSTRAP?\n")
