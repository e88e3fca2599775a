"""Shared fixtures of the operators tests (no broker, no pipeline imports: this folder runs on a GPU box)."""

from __future__ import annotations

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
