"""Which fast paths exist on this machine: FBGEMM GenAI kernels, FP8 tensor cores, the CPU's int8 dot products.

Each fallback is logged once (fxquant.log.log_once), never taken silently.
"""

from __future__ import annotations

import functools
import logging

import torch

from fxquant.log import log_once

# FP8 (e4m3) tensor-core GEMMs need Ada (8.9) or Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)


@functools.cache
def fbgemm_genai_available() -> bool:
    """True when fbgemm-gpu-genai imports and registers its FP8 rowwise ops."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401
    except Exception as error:  # ImportError, or an ABI mismatch raising OSError/RuntimeError
        log_once(logging.INFO, f"fxquant: fbgemm-gpu-genai unavailable ({error}); using torch._scaled_mm")
        return False
    available = hasattr(torch.ops.fbgemm, "f8f8bf16_rowwise") and hasattr(torch.ops.fbgemm, "quantize_fp8_per_row")
    if not available:
        log_once(logging.INFO, "fxquant: fbgemm-gpu-genai lacks f8f8bf16_rowwise; using torch._scaled_mm")
    return available


@functools.cache
def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why FP8 GEMMs cannot run on `device`, or None when they can (CPU runs the reference).
    Cached: the eager ops ask on every call."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} (sm_{capability[0]}{capability[1]}) has no FP8 tensor cores (needs sm_89+)"
    return None


# x86 instructions that multiply-add int8 in one step; oneDNN's int8 GEMM (aten._int_mm on the CPU)
# runs its fast kernels with one of them. Without them it falls to a reference loop: 20-40x slower
# than the fp32 matmul of the same shape on a 2-core AVX2 EPYC (benchmarks/RESULTS.md).
CPU_INT8_DOT_PRODUCTS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_int8_slow_reason() -> str | None:
    """Why int8 GEMMs would run slower than float on this CPU, or None when it has int8 dot products."""
    capabilities = cpu_capabilities()
    if any(capabilities.get(name, False) for name in CPU_INT8_DOT_PRODUCTS):
        return None
    name = capabilities.get("cpu_name") or torch.backends.cpu.get_cpu_capability()
    return f"{name} has no int8 dot-product instructions ({', '.join(CPU_INT8_DOT_PRODUCTS)}): int8 GEMMs run slower than float there"


def cpu_capabilities() -> dict[str, object]:
    """The CPU's instruction sets by name ("avx512_vnni": True), as torch reads them (cpuinfo)."""
    if hasattr(torch._C._cpu, "_get_cpu_capability"):  # torch >= 2.12
        return dict(torch._C._cpu._get_cpu_capability())
    return {"avx512_vnni": torch.cpu._is_vnni_supported(), "amx_int8": torch.cpu._is_amx_tile_supported()}
