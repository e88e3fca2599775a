"""Saving and loading forecasters: round trip, content-hash versions, refusal of tampered or pickled files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster
from liquidstream.operators.errors import ModelFormatError
from liquidstream.operators.model_io import load_model, model_version, save_model

CELLS = {
    "cfc": {"cell": "cfc"},
    "liquid": {"cell": "liquid", "cell_options": {"tau_min": 0.05}},
    "ltc": {"cell": "ltc", "cell_options": {"ode_unfolds": 3}},
}




def make_model(kind: str = "cfc", seed: int = 0) -> Forecaster:
    torch.manual_seed(seed)
    model = Forecaster(n_channels=3, hidden_size=6, head_units=8, min_std=0.1, **CELLS[kind])  # type: ignore[arg-type]
    with torch.no_grad():  # the head starts at zero; make it matter
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def outputs(model: Forecaster) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    x = torch.randn(5, 3, generator=g)
    h = torch.randn(5, 6, generator=g) * 0.5
    dt = torch.tensor([0.0, 0.1, 1.0, 30.0, 3600.0])
    with torch.no_grad():
        h2 = model.advance(h, x, dt)
        mu, sd = model.forecast(h2, x, dt)
    return [h2, mu, sd]


@pytest.mark.parametrize("kind", list(CELLS))
def test_round_trip_identical_outputs(kind: str, tmp_path: Path) -> None:
    model = make_model(kind)
    path = tmp_path / "sub" / "m.pt"
    version = save_model(model, path, metadata={"trained_on": "unit-test", "epochs": 3})
    assert path.exists() and path.with_suffix(".json").exists()
    loaded, doc = load_model(path)
    assert type(loaded.cell) is type(model.cell) and loaded.config() == model.config()
    assert not loaded.training
    for a, b in zip(outputs(model), outputs(loaded), strict=True):
        assert torch.equal(a, b)
    assert doc["version"] == version == model_version(loaded) == model_version(model)
    assert doc["metadata"] == {"trained_on": "unit-test", "epochs": 3}


def test_version_is_content_hash(tmp_path: Path) -> None:
    a, b = make_model(seed=0), make_model(seed=0)
    assert model_version(a) == model_version(b)  # same bytes, same version, whoever computes it
    v1 = save_model(a, tmp_path / "a.pt")
    v2 = save_model(load_model(tmp_path / "a.pt")[0], tmp_path / "b.pt")
    assert v1 == v2 == model_version(a)
    with torch.no_grad():
        next(b.head.parameters()).view(-1)[0] += 1e-6
    assert model_version(b) != v1
    assert model_version(make_model(seed=1)) != v1
    assert len(v1) == 12 and int(v1, 16) >= 0


def test_weights_changed_behind_config_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model(make_model(), path)
    other = make_model(seed=7)
    torch.save(other.state_dict(), path)  # same architecture, different weights: the version no longer matches
    with pytest.raises(ModelFormatError, match="version"):
        load_model(path)


@pytest.mark.parametrize(("key", "value"), [("hidden_size", 7), ("n_channels", 4), ("head_units", 9),
                                            ("cell", "liquid"), ("hidden_size", 0), ("cell", "gru"),
                                            ("no_such_option", 1)])
def test_tampered_config_is_refused(tmp_path: Path, key: str, value: Any) -> None:
    path = tmp_path / "m.pt"
    save_model(make_model(), path)
    cfg = path.with_suffix(".json")
    doc = json.loads(cfg.read_text())
    load_model(path)  # control: loads before tampering
    doc["model"][key] = value
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ModelFormatError):
        load_model(path)


@pytest.mark.parametrize("text", ["not json", '{"format": 99, "model": {}}', '{"format": 1}', ""])
def test_bad_config_document(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.pt"
    save_model(make_model(), path)
    path.with_suffix(".json").write_text(text)
    with pytest.raises(ModelFormatError):
        load_model(path)


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "null"])
def test_config_document_not_an_object(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.pt"
    save_model(make_model(), path)
    path.with_suffix(".json").write_text(text)
    with pytest.raises(ModelFormatError):
        load_model(path)


def test_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    with pytest.raises(ModelFormatError):
        load_model(path)
    save_model(make_model(), path)
    path.unlink()
    with pytest.raises(ModelFormatError):
        load_model(path)


def test_truncated_weights(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model(make_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError):
        load_model(path)


def test_pt_is_a_plain_state_dict(tmp_path: Path) -> None:
    model = make_model("ltc")
    path = tmp_path / "m.pt"
    save_model(model, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert isinstance(state[k], torch.Tensor) and torch.equal(state[k], v)


class _Payload:
    """Unpickling this creates a file: proof that the payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def write_bad_weights(path: Path, how: str, sentinel: Path) -> None:
    if how == "pickled-object":
        path.write_bytes(pickle.dumps(_Payload(sentinel)))
    elif how == "torch-saved-object":
        torch.save({"head.0.weight": _Payload(sentinel)}, path)
    elif how == "numpy-arrays":
        torch.save({k: v.numpy() for k, v in make_model().state_dict().items()}, path)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_bytes(b"hello world")
    elif how == "noise":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    else:
        raise AssertionError(how)


BAD_WEIGHTS = ["pickled-object", "torch-saved-object", "numpy-arrays", "empty", "text", "noise"]


@pytest.mark.parametrize("how", BAD_WEIGHTS)
def test_unsafe_or_corrupt_weights_refused_without_running(tmp_path: Path, how: str) -> None:
    path = tmp_path / "m.pt"
    save_model(make_model(), path)
    sentinel = tmp_path / "pwned"
    write_bad_weights(path, how, sentinel)
    with pytest.raises(ModelFormatError):
        load_model(path)
    assert not sentinel.exists(), "loading a model executed a pickled payload"


@pytest.mark.parametrize("how", BAD_WEIGHTS)
def test_unsafe_or_corrupt_weights_raise_model_format_error(tmp_path: Path, how: str) -> None:
    path = tmp_path / "m.pt"
    save_model(make_model(), path)
    write_bad_weights(path, how, tmp_path / "pwned")
    with pytest.raises(ModelFormatError):
        load_model(path)


def test_load_to_device_and_back(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    model = make_model()
    save_model(model, path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded, _ = load_model(path, device=device)
    assert next(loaded.parameters()).device.type == device
    assert model_version(loaded) == model_version(model)


def test_config_without_absolute_head_loads_a_model_saved_before_it(tmp_path: Path) -> None:
    """A model saved before ``absolute_head`` existed: its JSON has no such key and its head 2C outputs."""
    torch.manual_seed(3)
    old = Forecaster(n_channels=3, hidden_size=6, head_units=8, absolute_head=False).eval()
    path = tmp_path / "old.pt"
    version = save_model(old, path)
    cfg_file = path.with_suffix(".json")
    doc = json.loads(cfg_file.read_text())
    del doc["model"]["absolute_head"]  # exactly what an older release wrote
    cfg_file.write_text(json.dumps(doc))
    loaded, got = load_model(path)
    assert not loaded.absolute_head and got["version"] == version
    h, x, dt = torch.randn(2, 6), torch.randn(2, 3), torch.ones(2)
    assert loaded.forecast_all(h, x, dt)[2] is None
    new = Forecaster(n_channels=3, hidden_size=6, head_units=8)
    assert new.absolute_head and new.config()["absolute_head"] is True
    assert Forecaster.from_config(new.config()).absolute_head
