"""Saving and loading forecasters: a plain state dict plus a JSON config, never a pickled object.

``save_model(model, "m.pt")`` writes ``m.pt`` (``torch.save`` of the state dict: tensors only) and
``m.json`` (architecture, version, free-form metadata).  ``load_model`` rebuilds the architecture from the
JSON and loads the tensors with ``torch.load(..., weights_only=True)``, which refuses arbitrary objects.
The version is a content hash of the weights, so two workers serving the same bytes report the same
version and a changed model can never masquerade as an old one.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from liquidstream.operators.errors import ConfigError, ModelFormatError
from liquidstream.operators.forecaster import Forecaster

CONFIG_FORMAT = 1


def model_version(model: Forecaster) -> str:
    """First 12 hex digits of SHA-256 over the state dict (names, dtypes, shapes and bytes).

    >>> torch.manual_seed(0) and None
    >>> len(model_version(Forecaster(n_channels=2, hidden_size=4, cell="liquid")))
    12
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:12]


def config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_model(model: Forecaster, path: str | Path, metadata: dict[str, Any] | None = None) -> str:
    """Write ``path`` (state dict) and its ``.json`` config; returns the model version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    version = model_version(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, path)
    doc = {"format": CONFIG_FORMAT, "version": version, "model": model.config(), "metadata": metadata or {}}
    config_path(path).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return version


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Forecaster, dict[str, Any]]:
    """Rebuild a saved model; returns it (in eval mode) and its JSON document (version, metadata)."""
    path = Path(path)
    cfg_file = config_path(path)
    try:
        doc = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as ex:
        msg = f"cannot read model config {cfg_file}: {ex}"
        raise ModelFormatError(msg) from ex
    if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT or not isinstance(doc.get("model"), dict):
        fmt = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        msg = f"{cfg_file} is not a liquidstream model config (format {fmt!r})"
        raise ModelFormatError(msg)
    try:
        model = Forecaster.from_config(doc["model"])  # a config without absolute_head: a model without it
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    # torch.load refuses unsafe or corrupt files with UnpicklingError, EOFError, KeyError, ValueError...
    except (OSError, RuntimeError, TypeError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
            ConfigError) as ex:
        msg = f"cannot load model weights {path} with config {cfg_file}: {ex}"
        raise ModelFormatError(msg) from ex
    model = model.to(device).eval()
    version = model_version(model)
    if doc.get("version") not in (None, version):
        msg = f"model {path} has version {version}, but its config says {doc.get('version')}"
        raise ModelFormatError(msg)
    doc["version"] = version
    return model, doc
