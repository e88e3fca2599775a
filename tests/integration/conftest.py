"""Fixtures for the worker's integration tests: a small trained model, saved once per session.

The broker fixtures (``kafka_bootstrap``, ``kafka_admin``, ``make_topic``) live in ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Training data for the session model: a fleet separate from (other seed than) every test stream.
TRAIN_DEVICES = 64
TRAIN_DURATION_S = 300.0  # simulated seconds per device
TRAIN_SEED = 99


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.pt`` of a tiny CfC forecaster trained for two epochs on incident-free simulated readings.

    A few seconds on two cores; good enough that the worker's alerts find most injected incidents.
    """
    import torch

    from operators.model_io import save_model
    from pipeline.demo import DemoConfig, train_model
    from pipeline.settings import Settings
    from pipeline.simulator import simulate

    stream = simulate(n_devices=TRAIN_DEVICES, duration_s=TRAIN_DURATION_S, seed=TRAIN_SEED, anomaly_rate=0.0)
    cfg = DemoConfig(hidden_size=16, epochs=2, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only add contention on a busy host
    try:
        model, _ = train_model(stream, cfg, Settings(device="cpu"), show=False)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(model, path, {"trained_on": "integration-test simulator", "seed": TRAIN_SEED})
    return path
