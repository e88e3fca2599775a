"""Shared fixtures of the operators tests (no broker, no pipeline imports: this folder runs on a GPU box)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

CUDA = torch.cuda.is_available()
#: Every device-parametrised test runs on the CPU and, where present, on CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead (tens of times slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["tensor", "compiled"])
def step_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per step path: ``step_path="auto"`` (the default every test operator uses) pinned to the
    tensor waves or to the compiled per-device step (where the model and device allow it)."""
    import liquidstream.operators.operator as operator_module

    monkeypatch.setattr(operator_module, "COMPILED_MIN_READINGS_PER_DEVICE",
                        0.0 if request.param == "compiled" else math.inf)
    return str(request.param)


#: Mark for the contract tests that must hold on both step paths (the operator's results do not depend on it).
BOTH_PATHS = pytest.mark.usefixtures("step_path")
