"""cuBLAS's blockwise-scaled FP8 GEMM for fp8_blockwise: `torch._scaled_mm` with BlockWise1x128
activation scales and BlockWise128x128 weight scales (Hopper, CUDA >= 12.9), the DeepSeek-V3 recipe.

It is used only where a one-time check on the device shows it runs and matches fxquant's
reference (fxquant/ops/fp8_blockwise.py); anything else takes fxquant's Triton kernel.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from fxquant.log import log_once
from fxquant.ops.fp8_blockwise import (
    block_sizes,
    blockwise_gemm_reference,
    quantize_fp8_blockwise_weight,
    quantize_fp8_groupwise,
)

CUBLAS_BLOCK = (128, 128)  # the weight block cuBLAS scales by (activations: 1 x 128)


def cublas_blockwise_mm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """fp8_blockwise_mm by cuBLAS (`torch._scaled_mm` with BlockWise1x128 x BlockWise128x128
    scales). cuBLAS wants the activation scales outer-dim-major with a leading dimension (M) that
    is a multiple of 4 (it answers CUBLAS_STATUS_NOT_SUPPORTED otherwise, measured on the H100), so
    other M are padded with zero rows; it takes no fast accumulation."""
    rows = x_q.shape[0]
    padding = -rows % 4
    if padding:
        x_q = torch.cat([x_q, x_q.new_zeros(padding, x_q.shape[1])])
        x_scale = torch.cat([x_scale, x_scale.new_ones(padding, x_scale.shape[1])])
    out = torch._scaled_mm(
        x_q, w_q.t(), scale_a=x_scale.t().contiguous().t(), scale_b=w_scale.t(),
        out_dtype=torch.bfloat16, use_fast_accum=False,
    )
    return out[:rows] if padding else out


_CUBLAS_BLOCKWISE_WORKS: dict[torch.device, bool] = {}


def cublas_blockwise_works(device: torch.device) -> bool:
    """Whether cuBLAS's blockwise-scaled GEMM runs on `device` and matches the reference (within
    bf16 rounding) on small problems with distinct scales per block; checked once per device, never
    while a CUDA graph is being captured (that call takes the Triton kernel; warm-up runs first)."""
    if device not in _CUBLAS_BLOCKWISE_WORKS:
        if torch.cuda.is_current_stream_capturing():
            return False
        _CUBLAS_BLOCKWISE_WORKS[device] = _check_cublas_blockwise(device)
    return _CUBLAS_BLOCKWISE_WORKS[device]


def _check_cublas_blockwise(device: torch.device) -> bool:
    generator = torch.Generator(device=device).manual_seed(0)
    try:
        for m in (1, 16, 130):
            x = torch.randn(m, 512, device=device, generator=generator) * 4
            w = torch.randn(256, 512, device=device, generator=generator) * torch.rand(256, 1, device=device, generator=generator)
            x_q, x_scale = quantize_fp8_groupwise(x, CUBLAS_BLOCK[1])
            w_q, w_scale = quantize_fp8_blockwise_weight(w, CUBLAS_BLOCK)
            expected = blockwise_gemm_reference(x_q, x_scale, w_q, w_scale)
            error = ((cublas_blockwise_mm(x_q, x_scale, w_q, w_scale).float() - expected).norm() / expected.norm()).item()
            if not error < 1e-2:
                log_once(logging.WARNING, f"fxquant: cuBLAS blockwise GEMM is off by {error:.2e} on {device}; using Triton")
                return False
    except RuntimeError as error:
        log_once(logging.INFO, f"fxquant: cuBLAS blockwise GEMM unavailable on {device} ({str(error)[:200]}); using Triton")
        return False
    log_once(logging.INFO, f"fxquant: fp8_blockwise GEMMs with 128 x 128 blocks use cuBLAS on {device}")
    return True


def cublas_blockwise_fits(x_q: Tensor, w_q: Tensor, w_scale: Tensor) -> bool:
    """The shapes cuBLAS's blockwise path takes: 128 x 128 weight blocks, and (newer torch checks
    this stride) a whole number of 4-block rows of weight scales."""
    return x_q.shape[0] > 0 and block_sizes(w_q, w_scale) == CUBLAS_BLOCK and w_scale.shape[1] % 4 == 0
