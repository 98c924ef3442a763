"""What Inductor's caches cannot see of fxquant: its lowering code and the GEMM choice.

Inductor (and AOTAutograd, whose cache holds the graph after decomposition) keys a compiled graph by
the graph, its config and torch's own sources. fxquant's decompositions, lowering, Triton templates
and extern GEMM wrappers live outside those, `FXQUANT_GEMM`, `FXQUANT_GROUPED_GEMM` and
`FXQUANT_INT8_GEMM` are environment variables, the heuristic's choice depends on whether
fbgemm-gpu-genai loads, and int8's CPU decomposition on whether the CPU has int8 dot products, so
without a tag of its own an edited lowering, another forced choice or another machine would reuse
code compiled for the old one. The backend (and fxquant's AOTInductor) compiles every graph that
holds fxquant's ops under this tag.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
from torch import fx

from fxquant.ops.availability import cpu_int8_slow_reason, fbgemm_genai_available

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
    cpu_int8 = "cpu-int8" if cpu_int8_slow_reason() is None else "cpu-int8-as-float"
    forced = ":".join(os.environ.get(name, "") for name in ("FXQUANT_GROUPED_GEMM", "FXQUANT_INT8_GEMM", "FXQUANT_GEMM"))
    return f"{torch.compiler.config.cache_key_tag}|fxquant:{_sources_hash()}:{cpu_int8}:{fbgemm}:{forced}"


def holds_fxquant_ops(gm: fx.GraphModule) -> bool:
    """Whether `gm` calls any of fxquant's ops (torch.ops.fxquant.*)."""
    return any(isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "fxquant" for node in gm.graph.nodes)
