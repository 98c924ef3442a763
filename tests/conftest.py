"""Shared test set-up: one on-disk Inductor cache for the whole suite, and the `gpu` marker's skip."""

import os
import pathlib

import pytest
import torch

# Compiles dominate the suite's time on a 2-core machine; a warm cache makes reruns fast.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".inductor-cache"))

import fxquant  # noqa: E402,F401  (registers torch.ops.fxquant.*)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and sees its own counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
