"""Shared test set-up: one on-disk Inductor cache for the whole suite, the `gpu` marker's skip, and one
kind of CPU for "auto"."""

import os
import pathlib

import pytest
import torch

# Compiles dominate the suite's time on a 2-core machine; a warm cache makes reruns fast.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".inductor-cache"))

import fxquant  # noqa: E402,F401  (registers torch.ops.fxquant.*)
from fxquant import config as config_module  # noqa: E402


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


@pytest.fixture(autouse=True)
def cpu_with_int8_dot_products(monkeypatch):
    """"auto" means int8 on the CPU in every test, whether or not this CPU has VNNI or AMX (without them
    auto leaves layers unquantized): tests/test_auto_scheme.py checks both kinds of CPU."""
    monkeypatch.setattr(config_module, "cpu_int8_slow_reason", lambda: None)
