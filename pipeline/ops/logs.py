"""Process logging: one JSON object per line for log collectors, a readable line for terminals, no secrets.

JSON lines carry ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``, every field passed
with ``extra=`` (``log.info("late reading", extra={"device": "pump-7", "partition": 3})``) and ``exc`` for
an exception.  The human format prints the same extras as ``key=value`` after the message.

Redaction (:class:`RedactingFilter`, installed on the handler so every logger's records pass it) replaces
with ``***``: a :class:`~pydantic.SecretStr` anywhere in the arguments or extras, the value of any key that
names a secret (``sasl.password``, ``ssl.key.password``, ``*secret*``, ``*token*``, ``*signing_key*`` ...)
in mappings and in ``key=value`` / ``"key": "value"`` text, and every known secret value (the settings'
``SecretStr`` fields and secret-named ``kafka_config`` entries) wherever it appears in the final text.

>>> redact_text("auth sasl.password=hunter22 ok", frozenset())
'auth sasl.password=*** ok'
>>> redact({"sasl.username": "u", "ssl.key.password": "p"}, frozenset())
{'sasl.username': 'u', 'ssl.key.password': '***'}
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import SecretStr

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.settings import Settings

__all__ = ["REDACTED", "HumanFormatter", "JsonFormatter", "RedactingFilter", "is_secret_key", "redact",
           "redact_text", "secrets_of", "setup_logging"]

REDACTED = "***"
#: Known secret values shorter than this are not searched for in free text: redacting every "ab" in every
#: line would garble logs while hiding nothing an attacker could not guess anyway.
MIN_SECRET_LEN = 4
_SENSITIVE_WORDS = r"pass(?:word|wd)?|secret|token|credential|signing[._-]?key|private[._-]?key|api[._-]?key|jaas"
_SECRET_KEY = re.compile(rf"(?:{_SENSITIVE_WORDS})", re.IGNORECASE)
# key, then = or : (optionally inside quotes), then the value up to a delimiter, unless already masked.
_SECRET_PAIR = re.compile(rf"""(?P<key>[\w.\-]*(?:{_SENSITIVE_WORDS})[\w.\-]*)(?P<sep>["']?\s*[=:]\s*["']?)"""
                          r"""(?!SecretStr\(|\*)(?P<val>[^\s"',;}&)\]]+)""", re.IGNORECASE)
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str, secrets: frozenset[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return _SECRET_PAIR.sub(lambda m: f"{m['key']}{m['sep']}{REDACTED}", text)


def redact(value: Any, secrets: frozenset[str]) -> Any:
    """A copy of ``value`` with secrets replaced (mappings, sequences and strings, recursively)."""
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_key(str(k)) else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return type(value)(redact(v, secrets) for v in value)
    return value


def secrets_of(settings: Settings) -> frozenset[str]:
    """Secret values a log line must never show: every ``SecretStr`` setting (including ones added later,
    such as a model-signing key) and the secret-named entries of ``kafka_config``."""
    found = [getattr(settings, name) for name in type(settings).model_fields]
    values = {v.get_secret_value() for v in found if isinstance(v, SecretStr)}
    values |= {v for k, v in settings.kafka_config.items() if is_secret_key(k)}
    return frozenset(v for v in values if len(v) >= MIN_SECRET_LEN)


class RedactingFilter(logging.Filter):
    """Rewrites each record in place (message, arguments, extras, exception text); never drops one."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = frozenset(s for s in secrets if len(s) >= MIN_SECRET_LEN)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(redact(a, self.secrets) for a in args)
            if len(record.args) == 1 and isinstance(record.args[0], Mapping):
                record.args = record.args[0]  # "%(key)s" style keeps its mapping
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call must not crash the caller (filters run outside handleError)
            message = f"{record.msg!r} (arguments did not match the format)"
        record.msg = redact_text(message, self.secrets)
        record.args = None
        for key in set(vars(record)) - _STANDARD:
            value = getattr(record, key)
            setattr(record, key, REDACTED if is_secret_key(key) else redact(value, self.secrets))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``static`` fields (e.g. the worker id) are added to every line."""

    def __init__(self, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        doc: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        doc |= self.static | _extras(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,123 INFO liquidstream.worker: message  device=pump-7 partition=3``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        head, sep, tail = line.partition("\n")  # extras go on the message line, before any traceback
        return f"{head}  " + " ".join(f"{k}={v}" for k, v in extras.items()) + sep + tail


def setup_logging(settings: Settings, *, stream: TextIO | None = None,
                  static: Mapping[str, Any] | None = None) -> logging.Handler:
    """Route every logger to ``stream`` (default stderr: stdout carries the commands' JSON results).

    The format is ``settings.log_format`` when it was set explicitly (env or flag); otherwise human on a
    terminal and JSON elsewhere (containers, CI, files).  Replaces any handlers set up before.
    """
    out = stream if stream is not None else sys.stderr
    level = settings.log_level.upper()
    if level not in logging.getLevelNamesMapping():
        msg = f"log_level {settings.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
        raise ConfigurationError(msg)
    fmt = settings.log_format if "log_format" in settings.model_fields_set else \
        ("human" if out.isatty() else "json")
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter(secrets_of(settings)))
    handler.setFormatter(JsonFormatter(static) if fmt == "json" else HumanFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return handler
