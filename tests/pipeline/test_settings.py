"""The one frozen settings object: environment, nesting, immutability, Kafka pass-through."""

from __future__ import annotations

import pydantic
import pytest

from liquidstream.operators.errors import ConfigError
from liquidstream.pipeline.settings import Settings


def test_env_and_nested_operator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQUIDSTREAM_INPUT_TOPIC", "sensors")
    monkeypatch.setenv("LIQUIDSTREAM_OPERATOR__LATE_POLICY", "accept")
    monkeypatch.setenv("LIQUIDSTREAM_OPERATOR__ALERT_PROBABILITY", "1e-5")
    s = Settings()
    assert s.input_topic == "sensors"
    assert s.operator.late_policy == "accept" and s.operator.alert_probability == 1e-5
    assert Settings(input_topic="other").input_topic == "other"  # explicit values win over the environment


def test_frozen() -> None:
    s = Settings()
    with pytest.raises(pydantic.ValidationError):
        s.input_topic = "x"  # type: ignore[misc]


def test_invalid_operator_setting_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQUIDSTREAM_OPERATOR__MAX_GAP_S", "-3")
    with pytest.raises((pydantic.ValidationError, ConfigError)):
        Settings()


def test_kafka_security_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQUIDSTREAM_KAFKA_CONFIG", '{"socket.keepalive.enable": "true"}')
    s = Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                 sasl_password="p", ssl_ca_location="/etc/ca.pem")  # noqa: S106 - a test value
    conf = s.kafka_client_config()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "u" and conf["sasl.password"] == "p"
    assert conf["ssl.ca.location"] == "/etc/ca.pem" and conf["socket.keepalive.enable"] == "true"
    assert "p" not in repr(s.sasl_password)  # the secret is not printed
