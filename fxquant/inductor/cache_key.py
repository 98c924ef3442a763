"""What Inductor's FX graph cache cannot see of fxquant: its lowering code and the GEMM choice.

Inductor keys a compiled graph by the graph, its config and torch's own sources. fxquant's
lowering, Triton templates and extern GEMM wrappers live outside those, and `FXQUANT_GEMM` is an
environment variable, so without a tag of its own an edited lowering or another forced choice
would reuse code compiled for the old one. The backend compiles CUDA graphs under this tag.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent.parent
_LOWERING_SOURCES = ("inductor", "kernels", "ops")


@functools.cache
def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(p for folder in _LOWERING_SOURCES for p in (_PACKAGE / folder).glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key_tag() -> str:
    """torch.compiler.config.cache_key_tag extended with fxquant's lowering sources and GEMM choice."""
    return f"{torch.compiler.config.cache_key_tag}|fxquant:{_sources_hash()}:{os.environ.get('FXQUANT_GEMM', '')}"
