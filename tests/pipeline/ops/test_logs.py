"""Structured logs (liquidstream.pipeline.ops.logs): JSON lines with extras, the human format, and secrets never
shown."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.ops.logs import REDACTED, RedactingFilter, redact, secrets_of, setup_logging
from liquidstream.pipeline.settings import Settings

PASSWORD = "Sup3r-Secret-pw"  # noqa: S105 - a test value whose absence is checked
SIGNING = "signing-key-0123456789"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def secure_settings(**kw: Any) -> Settings:
    return Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                    sasl_password=SecretStr(PASSWORD),
                    kafka_config={"ssl.key.password": "keypass-456", "client.id": "w1"}, **kw)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_ts_level_logger_message_and_extras() -> None:
    out = io.StringIO()
    setup_logging(Settings(log_format="json"), stream=out, static={"worker": "w-1"})
    log = logging.getLogger("liquidstream.worker")
    log.info("late reading from %s", "pump-7", extra={"device": "pump-7", "partition": 3})
    log.debug("not shown at INFO")
    try:
        1 / 0  # noqa: B018 - raise something to log
    except ZeroDivisionError:
        log.exception("batch failed", extra={"offsets": [1, 2]})
    first, second = json_lines(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first.pop("ts"))
    assert first == {"level": "INFO", "logger": "liquidstream.worker", "message": "late reading from pump-7",
                     "worker": "w-1", "device": "pump-7", "partition": 3}
    assert second["level"] == "ERROR" and second["offsets"] == [1, 2]
    assert "ZeroDivisionError" in second["exc"] and second["exc"].startswith("Traceback")


def test_human_format_on_a_terminal_unless_forced() -> None:
    tty = Tty()
    setup_logging(Settings(), stream=tty)  # log_format not set explicitly: a terminal gets the human format
    logging.getLogger("liquidstream").warning("lag %d", 12, extra={"partition": 4})
    line = tty.getvalue().strip()
    assert re.fullmatch(r"\S+ \S+ WARNING liquidstream: lag 12  partition=4", line), line
    pipe = io.StringIO()
    setup_logging(Settings(), stream=pipe)  # not a terminal (container, CI): JSON
    logging.getLogger("liquidstream").warning("x")
    assert json_lines(pipe)[0]["message"] == "x"
    forced = Tty()
    setup_logging(Settings(log_format="json"), stream=forced)  # explicit setting wins over the terminal
    logging.getLogger("liquidstream").warning("y")
    assert json_lines(forced)[0]["message"] == "y"


def test_environment_sets_the_format_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQUIDSTREAM_LOG_FORMAT", "human")
    pipe = io.StringIO()
    setup_logging(Settings(), stream=pipe)
    logging.getLogger("liquidstream").info("hello")
    assert pipe.getvalue().rstrip().endswith("INFO liquidstream: hello")


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_secrets_never_reach_the_output(fmt: str) -> None:
    settings = secure_settings(log_format=fmt)
    out = io.StringIO()
    setup_logging(settings, stream=out)
    log = logging.getLogger("liquidstream.kafka")
    log.info("client config %s", settings.kafka_client_config())  # a dict with sasl.password in it
    log.info("settings %r", settings)
    log.info("password is %s", settings.sasl_password)  # SecretStr
    log.info("raw %s", PASSWORD)  # the value itself, with no telling key
    log.info("config text sasl.password=%s ssl.key.password: keypass-456", PASSWORD)
    log.info("extras", extra={"sasl.password": "anything", "conf": {"sasl.password": PASSWORD}, "token": "t0k"})
    try:
        msg = f"connect failed with {PASSWORD}"
        raise RuntimeError(msg)
    except RuntimeError:
        log.exception("boom")
    text = out.getvalue()
    for secret in (PASSWORD, "keypass-456", "t0k", "anything"):
        assert secret not in text, secret
    assert text.count(REDACTED) >= 8
    assert "svc" in text and "SCRAM-SHA-512" in text  # non-secret settings stay readable


def test_any_secretstr_setting_is_known_including_future_ones() -> None:
    assert secrets_of(secure_settings()) == {PASSWORD, "keypass-456"}

    class Future(Settings):
        model_signing_key: SecretStr | None = None

    assert SIGNING in secrets_of(Future(model_signing_key=SecretStr(SIGNING)))
    assert secrets_of(Settings(sasl_password=SecretStr("abc"))) == frozenset()  # too short to search text for


def test_redact_walks_nested_values() -> None:
    value = {"a": [SecretStr("x"), ("sasl.password=zz",)], "private_key": "k", "n": 3}
    assert redact(value, frozenset()) == {"a": [REDACTED, ("sasl.password=***",)], "private_key": REDACTED, "n": 3}


def test_a_malformed_log_call_does_not_raise() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d items", ("many",), None)
    assert RedactingFilter().filter(record)
    assert "arguments did not match" in record.getMessage()


def test_bad_level_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="log_level"):
        setup_logging(Settings(log_level="chatty"), stream=io.StringIO())


@pytest.mark.parametrize("command", [["simulate", "--devices", "1", "--events", "1"],
                                     ["run", "--channels", "2", "--device", "cpu", "--metrics-port", "0"]])
def test_kafka_commands_log_through_this_module_and_stop_on_bad_credentials(
        command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``run``/``simulate`` set up these logs, then preflight: a rejected login is one line and exit 2."""
    from liquidstream.pipeline.cli import entry as cli
    from liquidstream.pipeline.cli import kafka as cli_kafka
    from liquidstream.pipeline.ops import health

    assert vars(cli_kafka)["setup_logging"] is setup_logging  # no second, unredacted set-up of its own
    formatters: list[str] = []

    def rejected(settings: Settings, timeout_s: float = 20.0) -> bool:
        formatters.extend(type(h.formatter).__name__ for h in logging.getLogger().handlers)
        msg = ("Kafka authentication failed: SASL authentication error: Authentication failed during "
               "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512")
        raise ConfigurationError(msg)

    monkeypatch.setattr(health, "preflight", rejected)
    monkeypatch.setenv("LIQUIDSTREAM_SASL_PASSWORD", PASSWORD)
    assert cli.main(command) == 2
    out, err = capsys.readouterr()
    assert formatters == ["JsonFormatter"]  # stderr is not a terminal here
    assert err.strip().splitlines()[-1].startswith(f"liquidstream {command[0]}: error: Kafka authentication failed")
    assert PASSWORD not in out + err and out == ""
