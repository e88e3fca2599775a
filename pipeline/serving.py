"""The model a serving process runs: the saved one from the settings, or an untrained persistence forecaster.

One place for the ``run`` worker and the faust app to build their :class:`LiquidOperator` from
:class:`~liquidstream.pipeline.settings.Settings` (so the faust app does not import the command line).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from liquidstream.pipeline.errors import ConfigurationError
from liquidstream.pipeline.settings import Settings

if TYPE_CHECKING:  # torch is imported only by the commands that need it, not by `--help`
    from liquidstream.operators.operator import LiquidOperator

__all__ = ["DEFAULT_CHANNELS", "build_operator"]
log = logging.getLogger("liquidstream")

#: Channels of the untrained model served when no ``--model`` is given.
DEFAULT_CHANNELS = 4


def build_operator(settings: Settings, channels: int | None) -> LiquidOperator:
    """The :class:`LiquidOperator` to serve: the saved model, or an untrained persistence forecaster."""
    from liquidstream.operators import Forecaster, LiquidOperator
    from liquidstream.operators.model_io import load_model

    device = settings.torch_device()
    if settings.model is None:
        n = channels or DEFAULT_CHANNELS
        log.warning("no --model given: serving an UNTRAINED model with %d channels (its forecast is the last "
                    "reading, i.e. persistence); train one with `liquidstream train`", n)
        return LiquidOperator(Forecaster(n_channels=n, hidden_size=16), settings.operator, device=device,
                              model_version="untrained")
    model, doc = load_model(settings.model, device)
    if channels is not None and channels != model.n_channels:
        msg = f"--channels {channels} does not match model {settings.model} ({model.n_channels} channels)"
        raise ConfigurationError(msg)
    log.info("model %s version %s (%d channels) on %s", settings.model, doc["version"], model.n_channels,
             device)
    return LiquidOperator(model, settings.operator, device=device, model_version=str(doc["version"]))
