"""``docs/settings.md``, generated: every setting and operator knob with its variable, type, default, unit and meaning.

Read from the models themselves, never listed by hand: the fields of :class:`~liquidstream.pipeline.settings.Settings`
and of every nested settings object (the ``OperatorSettings`` dataclass, the pydantic ``OnlineSettings`` and
``InputMapping``), their types and defaults as the classes declare them, and their meaning from the ``#:`` comment
block above each field in the source (a field right below another without a comment of its own shares the block:
"see ``that_field``").  ``liquidstream settings`` prints it; a test compares it with ``docs/settings.md``.

>>> rows = setting_rows()
>>> next(r for r in rows if r.variable == "LIQUIDSTREAM_OPERATOR__MAX_GAP_S").unit
's'
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import textwrap
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from liquidstream.pipeline.settings import Settings

__all__ = ["SettingRow", "field_comments", "setting_rows", "settings_markdown", "unknown_variables"]

_FIELD = re.compile(r"^    (\w+)\s*:\s*[^=]+?(?:=\s*(.*?))?\s*(?:#\s*(.*))?$")
_UNITS = (("_ms", "ms"), ("_s", "s"), ("_bytes", "bytes"), ("_port", "TCP port"), ("_events", "readings"),
          ("_probability", "probability"), ("_fraction", "fraction"), ("_share", "fraction"))


@dataclass(frozen=True)
class SettingRow:
    variable: str
    type: str
    default: str
    unit: str
    meaning: str


def field_comments(cls: type) -> dict[str, str]:
    """``field -> meaning`` from the ``#:`` block above each field (or its trailing ``# ...`` comment)."""
    out: dict[str, str] = {}
    block: list[str] = []
    previous: str | None = None  # the last field, while no blank line or comment separates it from the next
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            block.append(stripped[2:].strip())
            previous = None
            continue
        match = _FIELD.match(line)
        if match and not stripped.startswith(("def ", "@", "model_config")):
            name, trailing = match.group(1), match.group(3)
            if block:
                out[name] = " ".join(block)
            elif trailing:
                out[name] = trailing.strip()
            elif previous is not None and f"``{name}``" in out.get(previous, ""):
                out[name] = f"see `{previous}`"  # named in the comment of the group it belongs to
            previous = name if block else previous
            block = []
            continue
        if not stripped or stripped.startswith("#"):
            previous = None if not stripped else previous
        block = [] if not stripped.startswith("#") else block
    return out


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("pydantic.types.", "")
    text = re.sub(r"<class '([\w.]*\.)?(\w+)'>", r"\2", text)
    text = re.sub(r"\b(?:[a-z_]+\.)+([A-Za-z_]\w*)", r"\1", text)  # module paths: the class name is enough
    text = re.sub(r"Optional\[(.*)\]", r"\1 | None", text)
    text = re.sub(r"Literal\[(.*?)\]", lambda m: " | ".join(m.group(1).split(", ")), text)
    return text.replace("|", "\\|")


def _unit(name: str, meaning: str) -> str:
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return unit
    return "readings" if "readings" in meaning.split(".")[0].lower() and name.endswith(("_after", "window")) else ""


def _fields(cls: type) -> list[tuple[str, Any, Any]]:
    """``(name, type, default)`` of a pydantic model's or a dataclass's fields, in declaration order."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [(n, f.annotation, f.get_default(call_default_factory=True)) for n, f in cls.model_fields.items()]
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        factory: Any = f.default_factory
        out.append((f.name, hints[f.name], f.default if f.default is not dataclasses.MISSING else factory()))
    return out


def _nested(annotation: Any) -> type | None:
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)):
        return annotation
    return None


def setting_rows(cls: type = Settings, prefix: str = "LIQUIDSTREAM_") -> list[SettingRow]:
    """One row per leaf setting, nested objects flattened with ``__``."""
    comments = field_comments(cls)
    rows: list[SettingRow] = []
    for name, annotation, default in _fields(cls):
        nested = _nested(annotation)
        if nested is not None:
            rows.extend(setting_rows(nested, f"{prefix}{name.upper()}__"))
            continue
        meaning = comments.get(name, "")
        if isinstance(default, tuple | list | dict):
            shown = f"`{default!r}`" if default else "empty"
        else:
            shown = "none" if default is None else f"`{default}`"
        rows.append(SettingRow(f"{prefix}{name.upper()}", _type_name(annotation), shown, _unit(name, meaning),
                               meaning.replace("|", "\\|")))
    return rows


def settings_markdown() -> str:
    """The whole of ``docs/settings.md``."""
    head = ["# Settings reference", "",
            "Generated by `liquidstream settings` from the settings models (`pipeline/settings.py`, "
            "`operators/config.py`, `operators/online/config.py`, `pipeline/wire/mapping.py`); "
            "`tests/pipeline/test_settings_doc.py` fails when this file is out of date. Every setting is an "
            "environment variable; nested ones use `__`. Command-line flags, where a command has one, override "
            "the environment. Lists and objects are JSON "
            "(`LIQUIDSTREAM_MAPPING__CHANNEL_FIELDS='[\"temp\",\"rpm\"]'`).",
            "", "| variable | type | default | unit | meaning |", "| --- | --- | --- | --- | --- |"]
    body = [f"| `{r.variable}` | {r.type} | {r.default} | {r.unit} | {r.meaning} |" for r in setting_rows()]
    return "\n".join([*head, *body]) + "\n"


def unknown_variables(environ: Mapping[str, str], prefix: str = "LIQUIDSTREAM_") -> list[str]:
    """One warning per ``LIQUIDSTREAM_*`` variable that names no setting (pydantic-settings ignores them
    silently), with the closest valid name.

    >>> unknown_variables({"LIQUIDSTREAM_BOOTSTRAP_SERVERS": "k:9092", "LIQUIDSTREAM_GROUP_ID": "g", "PATH": "/"})
    ['LIQUIDSTREAM_BOOTSTRAP_SERVERS is not a setting and is ignored; did you mean LIQUIDSTREAM_BOOTSTRAP?']
    """
    rows = [r.variable for r in setting_rows()]
    known = set(rows) | {f"{prefix}{name.upper()}" for name in Settings.model_fields}  # nested objects as JSON
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(prefix) or upper in known:
            continue
        close = difflib.get_close_matches(upper, rows, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see `liquidstream settings` for every setting"
        out.append(f"{name} is not a setting and is ignored; {hint}")
    return out
