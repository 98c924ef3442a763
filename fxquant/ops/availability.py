"""Which GPU paths exist on this machine: FBGEMM GenAI kernels, FP8 tensor cores.

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
