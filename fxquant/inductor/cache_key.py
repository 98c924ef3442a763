"""What Inductor's FX graph cache cannot see of fxquant: its lowering code and the GEMM choice.

Inductor keys a compiled graph by the graph, its config and torch's own sources. fxquant's
lowering, Triton templates and extern GEMM wrappers live outside those, `FXQUANT_GEMM`,
`FXQUANT_GROUPED_GEMM` and `FXQUANT_INT8_GEMM` are environment variables and the heuristic's choice depends on whether fbgemm-gpu-genai loads, so
without a tag of its own an edited lowering, another forced choice or a machine without FBGEMM
would reuse code compiled for the old one. The backend compiles CUDA graphs under this tag.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from fxquant.ops.availability import fbgemm_genai_available

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
    fbgemm = "fbgemm" if fbgemm_genai_available() else "no-fbgemm"
    forced = ":".join(os.environ.get(name, "") for name in ("FXQUANT_GROUPED_GEMM", "FXQUANT_INT8_GEMM", "FXQUANT_GEMM"))
    return f"{torch.compiler.config.cache_key_tag}|fxquant:{_sources_hash()}:{fbgemm}:{forced}"
