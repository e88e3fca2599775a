"""deploy/k8s and deploy/grafana agree with the code: settings, CLI, metrics port, probes and metric names.

No cluster here: the manifests are parsed (the mini YAML parser of tests/test_deploy_files.py, extended with
the compact ``- key: value`` sequence items Kubernetes manifests use) and checked statically, and the probe
paths are requested from a real :class:`~liquidstream.pipeline.ops.health.OpsServer`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from liquidstream.operators.config import OperatorSettings
from liquidstream.pipeline.cli import build_parser
from liquidstream.pipeline.ops.health import Health
from liquidstream.pipeline.ops.logs import is_secret_key
from liquidstream.pipeline.ops.metrics import Metrics
from liquidstream.pipeline.ops.server import OpsServer
from liquidstream.pipeline.settings import Settings
from tests.test_deploy_files import MiniYaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "liquidstream.json"
#: Environment names the manifests set ahead of the code, each documented in secret.yaml / docs.
FUTURE_ENV: set[str] = set()
#: Sub-commands the manifests run ahead of the CLI, each documented in trainer.yaml.
FUTURE_COMMANDS: set[str] = set()
PLACEHOLDER = "CHANGE-ME"


class K8sYaml(MiniYaml):
    """MiniYaml plus compact mappings in sequences (``- name: x`` / ``  value: y``) and ``{}``."""

    def _seq(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while (nxt := self._next()) is not None and nxt[0] == indent and nxt[1].startswith("- "):
            item = nxt[1][2:].strip()
            if re.match(r"""^[\w./"-]+:(\s|$)""", item):
                line = self.lines[self.i]  # re-read the item as a mapping indented past the dash
                self.lines[self.i] = line[:indent] + "  " + line[indent + 2:]
                out.append(self._map(indent + 2))
            else:
                self.i += 1
                out.append(self._value(item, indent))
        return out

    def _value(self, rest: str, indent: int) -> Any:
        return {} if rest == "{}" else super()._value(rest, indent)


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = K8sYaml((K8S / name).read_text()).block()
    return doc


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return {p.name: load(p.name) for p in sorted(K8S.glob("*.yaml"))}


def test_k8s_yaml_parser_handles_compact_sequence_items() -> None:
    text = "a:\n  - name: x\n    value: 1\n  - name: y\n    valueFrom:\n      k: [p]\n  - plain\nb: {}\n"
    assert K8sYaml(text).block() == {"a": [{"name": "x", "value": 1}, {"name": "y", "valueFrom": {"k": ["p"]}},
                                           "plain"], "b": {}}
    try:
        import yaml
    except ImportError:
        return
    for path in K8S.glob("*.yaml"):
        assert load(path.name) == yaml.safe_load(path.read_text()), path.name


def by_kind(docs: dict[str, dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs.values() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (one,) = deployment["spec"]["template"]["spec"]["containers"]
    c: dict[str, Any] = one
    return c


def test_kustomization_lists_every_manifest(docs: dict[str, dict[str, Any]]) -> None:
    listed = docs.pop("kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(docs)
    for name, doc in docs.items():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), name
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "liquidstream", name


def _check_env_name(name: str) -> None:
    assert name.startswith("LIQUIDSTREAM_"), name
    if name in FUTURE_ENV:
        return
    path = name.removeprefix("LIQUIDSTREAM_").lower().split("__")
    assert path[0] in Settings.model_fields, f"{name}: no Settings field {path[0]!r}"
    if len(path) > 1:
        assert path[0] == "operator" and len(path) == 2, name
        assert path[1] in {f.name for f in dataclasses.fields(OperatorSettings)}, name


def configured_settings(docs: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                        extra: dict[str, str] | None = None) -> Settings:
    env = by_kind(docs, "ConfigMap")["data"] | by_kind(docs, "Secret")["stringData"] | (extra or {})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()  # the values parse (types, JSON), not just the names


def test_config_and_secret_names_are_settings_fields(docs: dict[str, dict[str, Any]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config, secret = by_kind(docs, "ConfigMap")["data"], by_kind(docs, "Secret")["stringData"]
    for name, value in {**config, **secret}.items():
        _check_env_name(name)
        assert isinstance(value, str), f"{name}: ConfigMap/Secret values must be strings"
    assert not [n for n in config if is_secret_key(n)], "secrets belong in the Secret"
    assert set(secret) == {"LIQUIDSTREAM_SASL_USERNAME", "LIQUIDSTREAM_SASL_PASSWORD", "LIQUIDSTREAM_MODEL_SIGNING_KEY",
                           *FUTURE_ENV}
    assert set(secret.values()) == {PLACEHOLDER}, "only placeholders are committed"
    settings = configured_settings(docs, monkeypatch)
    assert settings.security_protocol.startswith("SASL") and settings.sasl_mechanism == "SCRAM-SHA-512"
    assert settings.sasl_password is not None and settings.log_format == "json"


def _parse_cli(args: list[str]) -> argparse.Namespace | None:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if args[0] not in subs.choices:
        assert args[0] in FUTURE_COMMANDS, f"unknown sub-command {args[0]!r}"
        return None
    return parser.parse_args(args)  # SystemExit on a bad flag


@pytest.mark.parametrize("manifest", ["worker.yaml", "trainer.yaml"])
def test_deployments_use_the_config_the_cli_and_the_secret(docs: dict[str, dict[str, Any]], manifest: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = docs[manifest]
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    c = container(deployment)
    refs = {k: v["name"] for ref in c["envFrom"] for k, v in ref.items()}
    assert refs == {"configMapRef": by_kind(docs, "ConfigMap")["metadata"]["name"],
                    "secretRef": by_kind(docs, "Secret")["metadata"]["name"]}
    extra = {e["name"]: e.get("value", "x") for e in c.get("env", [])}
    for name in extra:
        _check_env_name(name)
    configured_settings(docs, monkeypatch, extra)
    args = _parse_cli([str(a) for a in c["args"]])
    if args is None:  # a future sub-command: the manifest must say so
        assert "future" in (K8S / manifest).read_text().lower()
    for volume in spec["template"]["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            by_kind(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def _port(c: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == ref]
    return int(port)


def test_worker_serves_metrics_and_probes_on_metrics_port(docs: dict[str, dict[str, Any]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    worker = by_kind(docs, "Deployment", "liquidstream-worker")
    c = container(worker)
    settings = configured_settings(docs, monkeypatch)
    assert settings.metrics_port == Settings.model_fields["metrics_port"].default == 9108
    assert _port(c, "metrics") == settings.metrics_port
    probes = {k: (v["httpGet"]["path"], _port(c, v["httpGet"]["port"])) for k, v in c.items() if k.endswith("Probe")}
    assert probes == {"startupProbe": ("/healthz", 9108), "livenessProbe": ("/healthz", 9108),
                      "readinessProbe": ("/readyz", 9108)}
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("9108", "/metrics")
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert not any("gpu" in k for part in c["resources"].values() for k in part), "the worker runs on CPU"
    service = by_kind(docs, "Service")
    (sport,) = service["spec"]["ports"]
    assert sport["port"] == 9108 and _port(c, sport["targetPort"]) == 9108
    assert service["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    # The paths the kubelet and Prometheus will request exist on the real server (200 or 503, not 404).
    server = OpsServer(Metrics(), Health(), lambda: (False, "test"), host="127.0.0.1")
    port = server.start(0)
    try:
        for path in {p for p, _ in probes.values()} | {annotations["prometheus.io/path"]}:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:  # noqa: S310
                    status = resp.status
            except urllib.error.HTTPError as ex:
                status = ex.code
            assert status in (200, 503), path
    finally:
        server.stop()


def test_trainer_requests_one_gpu(docs: dict[str, dict[str, Any]]) -> None:
    c = container(by_kind(docs, "Deployment", "liquidstream-trainer"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["args"] == ["train-worker"]
    assert {e["name"]: e["value"] for e in c["env"]}["LIQUIDSTREAM_DEVICE"] == "cuda"


def test_hpa_scales_the_worker_on_a_registered_metric(docs: dict[str, dict[str, Any]]) -> None:
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == by_kind(docs, "Deployment", "liquidstream-worker")["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["external"]["metric"]["name"] == "liquidstream_consumer_lag"
    assert metric["external"]["metric"]["name"] in Metrics().series_names()
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


# ------------------------------------------------------------------------------------------ Grafana
def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_registered_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    metrics = Metrics()
    known = metrics.series_names()
    used = {name for expr in _exprs(dashboard) for name in re.findall(r"\bliquidstream_\w+", expr)}
    assert used and used <= known, sorted(used - known)
    families = {fam.name for fam in metrics.registry.collect()}
    assert {f for f in families if not any(u.startswith(f) for u in used)} == set(), "a metric has no panel"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "lag", "alerts", "dead letters", "model version", "devices",
                  "restore progress"):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "liquidstream"
