"""The deployment files agree with the code: docker-compose.yml and deploy/Dockerfile.

There is no Docker engine here, so the compose file is parsed and checked statically: the broker is Apache
Kafka 4.1.1 in KRaft mode, topics are created by a one-shot service, every ``liquidstream`` command line
parses with the real argparse parser, and every ``LIQUIDSTREAM_*`` variable is a Settings field.

PyYAML is not a dependency, so a small parser for the YAML subset the compose file uses lives here (block
mappings and sequences, flow sequences, quoted and plain scalars, ``|`` block scalars, comments); when
PyYAML happens to be installed the test checks the two parsers agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from liquidstream.operators.config import OperatorSettings
from liquidstream.pipeline.cli import COMMANDS, build_parser
from liquidstream.pipeline.cli.entry import _settings
from liquidstream.pipeline.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


# ------------------------------------------------------------------------------------------ mini YAML
def _strip_comment(text: str) -> str:
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


def _split_flow(inner: str) -> list[str]:
    items, buf, quote = [], "", None
    for ch in inner:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == ",":
            items.append(buf.strip())
            buf = ""
            continue
        buf += ch
    return [i for i in [*items, buf.strip()] if i]


def _scalar(text: str) -> Any:
    if text.startswith("["):
        return [_scalar(item) for item in _split_flow(text[1:-1])]
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


class MiniYaml:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.i = 0

    def _next(self) -> tuple[int, str] | None:
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if _strip_comment(line).strip():
                return len(line) - len(line.lstrip(" ")), _strip_comment(line).strip()
            self.i += 1
        return None

    def block(self) -> Any:
        nxt = self._next()
        assert nxt is not None
        return self._seq(nxt[0]) if nxt[1].startswith("- ") else self._map(nxt[0])

    def _map(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while (nxt := self._next()) is not None and nxt[0] == indent and not nxt[1].startswith("- "):
            key, sep, rest = nxt[1].partition(":")
            assert sep and (not rest or rest[0] == " "), f"line {self.i + 1}: not a mapping entry"
            self.i += 1
            out[key.strip()] = self._value(rest.strip(), indent)
        assert nxt is None or nxt[0] < indent, f"line {self.i + 1}: bad indentation"
        return out

    def _seq(self, indent: int) -> list[Any]:
        out = []
        while (nxt := self._next()) is not None and nxt[0] == indent and nxt[1].startswith("- "):
            self.i += 1
            out.append(self._value(nxt[1][2:].strip(), indent))
        return out

    def _value(self, rest: str, indent: int) -> Any:
        if rest in ("|", "|-"):
            return self._block_scalar(indent, keep_newline=rest == "|")
        if rest.startswith("[") and not rest.endswith("]"):  # a flow sequence over several lines
            while not rest.endswith("]"):
                rest += " " + _strip_comment(self.lines[self.i]).strip()
                self.i += 1
        if rest:
            return _scalar(rest)
        nxt = self._next()
        if nxt is None or nxt[0] < indent or (nxt[0] == indent and not nxt[1].startswith("- ")):
            return None
        return self.block()

    def _block_scalar(self, indent: int, *, keep_newline: bool) -> str:
        body: list[str] = []
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
                break
            body.append(line)
            self.i += 1
        while body and not body[-1].strip():
            body.pop()
        cut = min(len(x) - len(x.lstrip(" ")) for x in body if x.strip())
        return "\n".join(x[cut:] for x in body) + ("\n" if keep_newline else "")


def load_yaml(text: str) -> Any:
    return MiniYaml(text).block()


def test_mini_yaml_parses_the_subset_used() -> None:
    doc = load_yaml('a: 1\nb:\n  c: "x # y"  # comment\n  d: [e, "f g", 3]\nl:\n  - |\n    one\n    two\n'
                    "  - 'it''s'\nm: [p,\n    q]\nn:\n")
    assert doc == {"a": 1, "b": {"c": "x # y", "d": ["e", "f g", 3]}, "l": ["one\ntwo\n", "it's"],
                   "m": ["p", "q"], "n": None}


# ------------------------------------------------------------------------------------------ compose
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    text = COMPOSE.read_text()
    doc: dict[str, Any] = load_yaml(text)
    try:
        import yaml
    except ImportError:
        pass
    else:
        assert doc == yaml.safe_load(text), "the mini parser disagrees with PyYAML"
    return doc


def test_compose_runs_kafka_4_1_in_kraft_mode(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"kafka", "topics", "worker", "simulator"}
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller" and "CONTROLLER" in env["KAFKA_LISTENERS"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"] and "healthcheck" in kafka


def test_topics_service_is_one_shot_and_creates_the_worker_topics(compose: dict[str, Any]) -> None:
    services = compose["services"]
    topics = services["topics"]
    assert topics["restart"] == "no" and topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = "\n".join(topics["command"])
    assert "kafka-topics.sh" in script and "--create" in script and "--if-not-exists" in script
    env = services["worker"]["environment"]
    for var in ("INPUT_TOPIC", "PREDICTIONS_TOPIC", "ALERTS_TOPIC", "DLQ_TOPIC"):
        assert re.search(rf"\b{re.escape(env['LIQUIDSTREAM_' + var])}\b", script), var
    for name in ("worker", "simulator"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def _liquidstream_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith("liquidstream")}


def test_liquidstream_services_build_from_the_dockerfile(compose: dict[str, Any]) -> None:
    services = _liquidstream_services(compose)
    assert set(services) == {"worker", "simulator"}
    for svc in services.values():
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE


def _env_field(name: str) -> tuple[str, ...]:
    return tuple(name.removeprefix("LIQUIDSTREAM_").lower().split("__"))


def test_every_liquidstream_env_var_is_a_settings_field(compose: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    operator_fields = {f.name for f in dataclasses.fields(OperatorSettings)}
    seen = 0
    for svc in compose["services"].values():
        for name, value in (svc.get("environment") or {}).items():
            if not name.startswith("LIQUIDSTREAM_"):
                continue
            path = _env_field(name)
            assert path[0] in Settings.model_fields, f"{name}: no Settings field {path[0]!r}"
            if len(path) > 1:
                assert path[0] == "operator" and len(path) == 2 and path[1] in operator_fields, name
            monkeypatch.setenv(name, str(value))
            seen += 1
        settings = Settings()  # the values parse (types, JSON), not just the names
        for name in svc.get("environment") or {}:
            if name.startswith("LIQUIDSTREAM_"):
                monkeypatch.delenv(name)
        assert settings.model_config.get("frozen")
    assert seen >= 10


def test_every_command_parses_with_the_real_cli(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    names = {name for name, _ in COMMANDS}
    settings_by_service = {}
    for service, svc in _liquidstream_services(compose).items():
        command = [str(arg) for arg in svc["command"]]
        assert command[0] in names, f"{service}: unknown sub-command {command[0]!r}"
        flags = {a.split("=")[0] for a in command if a.startswith("--")}
        parser = build_parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub = subparsers.choices[command[0]]
        assert flags <= set(sub._option_string_actions), f"{service}: {flags - set(sub._option_string_actions)}"
        args = parser.parse_args(command)  # exits (SystemExit) on any bad flag or value
        for name, value in svc["environment"].items():
            monkeypatch.setenv(name, str(value))
        settings_by_service[service] = _settings(args)
        for name in svc["environment"]:
            monkeypatch.delenv(name)
    worker, sim = settings_by_service["worker"], settings_by_service["simulator"]
    assert (worker.bootstrap, worker.input_topic) == (sim.bootstrap, sim.input_topic) == ("kafka:9092", "readings")
    assert worker.log_format == "json" and worker.device == "cpu"


# ------------------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_installs_the_project_with_the_cli_as_entrypoint() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(re.fullmatch(r"RUN pip install (--no-cache-dir )?\.", ln) for ln in lines)
    assert 'ENTRYPOINT ["liquidstream"]' in lines
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY")}
    assert {"operators", "pipeline", "liquidstream"} <= copied and any(c.startswith("pyproject.toml") for c in copied)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["liquidstream"] == "liquidstream.pipeline.cli:main"
