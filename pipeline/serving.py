"""The model a serving process runs: the saved one from the settings, or an untrained persistence forecaster.

One place for the ``run`` worker and the faust app to build their :class:`LiquidOperator` from
:class:`~liquidstream.pipeline.settings.Settings` (so the faust app does not import the command line).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.settings import Settings

if TYPE_CHECKING:  # torch is imported only by the commands that need it, not by `--help`
    from pathlib import Path

    from liquidstream.operators.forecaster import Forecaster
    from liquidstream.operators.operator import LiquidOperator

__all__ = ["DEFAULT_CHANNELS", "build_operator", "check_mapping", "open_model"]
log = logging.getLogger("liquidstream")

#: Channels of the untrained model served when no ``--model`` is given.
DEFAULT_CHANNELS = 4


def open_model(path: Path, device: str = "cpu", flag: str = "--model") -> tuple[Forecaster, dict[str, Any]]:
    """:func:`~liquidstream.operators.model_io.load_model` for a user-given path: a missing file, or one that is not a
    model saved by ``liquidstream train``, is a :class:`ConfigurationError` naming the flag and the fix."""
    from liquidstream.operators.errors import ModelFormatError
    from liquidstream.operators.model_io import config_path, load_model

    fix = "train one with `liquidstream train --input readings.jsonl --out model.pt`"
    if not path.is_file():
        msg = f"{flag} {path}: no such file ({fix})"
        raise ConfigurationError(msg)
    if not config_path(path).is_file():
        msg = f"{flag} {path}: its config {config_path(path)} is missing (a model is saved as .pt + .json; {fix})"
        raise ConfigurationError(msg)
    try:
        return load_model(path, device)
    except ModelFormatError as ex:
        cause = ex.__cause__ if ex.__cause__ is not None else ex
        first = (str(cause).strip().splitlines() or [""])[0][:160]  # torch's own text runs over many lines
        msg = f"{flag} {path}: not a model saved by liquidstream ({type(cause).__name__}: {first}); {fix}"
        raise ConfigurationError(msg) from ex


def check_mapping(settings: Settings, n_channels: int, what: str) -> None:
    """The input mapping's channel count (wide, long) must be the model's."""
    fixed = settings.mapping.n_channels
    if fixed is not None and fixed != n_channels:
        msg = (f"the input mapping names {fixed} channel(s) ({', '.join(settings.mapping.channel_fields)}) but {what} "
               f"has {n_channels}: give --channel-fields with {n_channels} names, in the model's order")
        raise ConfigurationError(msg)


def build_operator(settings: Settings, channels: int | None) -> LiquidOperator:
    """The :class:`LiquidOperator` to serve: the saved model, or an untrained persistence forecaster."""
    from liquidstream.operators import Forecaster, LiquidOperator

    device = settings.torch_device()
    if settings.model is None:
        n = channels or settings.mapping.n_channels or DEFAULT_CHANNELS
        check_mapping(settings, n, "--channels")
        log.warning("no --model given: serving an UNTRAINED model with %d channels (its forecast is the last "
                    "reading, i.e. persistence); train one with `liquidstream train`", n)
        return LiquidOperator(Forecaster(n_channels=n, hidden_size=16), settings.operator, device=device,
                              model_version="untrained")
    model, doc = open_model(settings.model, device)
    check_mapping(settings, model.n_channels, f"model {settings.model}")
    if channels is not None and channels != model.n_channels:
        msg = f"--channels {channels} does not match model {settings.model} ({model.n_channels} channels)"
        raise ConfigurationError(msg)
    log.info("model %s version %s (%d channels) on %s", settings.model, doc["version"], model.n_channels,
             device)
    return LiquidOperator(model, settings.operator, device=device, model_version=str(doc["version"]))
