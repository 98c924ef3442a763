"""FP8 blockwise ops (DeepSeek-V3 style): e4m3 weights with one scale per (block_n x block_k)
block, e4m3 activations with one dynamic scale per token per block_k-wide group of channels.

The block sizes are read off the shapes: w_scale is [N / block_n, K / block_k]. The CPU reference
accumulates each K-block's exact fp8 products in float32 and scales them by that block's
activation and weight scales, as the GPU kernels do in their main loop. On CUDA the GEMM
(fp8_blockwise_mm) is cuBLAS's blockwise-scaled `torch._scaled_mm` (1 x 128 activation groups,
128 x 128 weight blocks: Hopper, CUDA >= 12.9) where a first call on the device proves it exact
against the reference, else fxquant's Triton kernel (fxquant/kernels/fp8_blockwise_gemm.py), which
takes any block size. FBGEMM's `f8f8bf16_blockwise` takes 128x128 activation blocks only, a
coarser scheme; the GPU tests compare it with ours.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.availability import fp8_unsupported_reason
from fxquant.ops.fp8_common import FP8_DTYPE, fp8_scale, saturate_to_fp8
from fxquant.ops.linear_common import (
    check_linear_inputs,
    bf16_gemm_epilogue,
    dequantized_epilogue,
    gemm_output,
    linear_output,
    register_inference_only_autograd,
)


def quantize_fp8_groupwise(x: Tensor, group_size: int, scale_ub: float | None = None) -> tuple[Tensor, Tensor]:
    """Quantize `x` [..., K] in groups of `group_size` channels: (x_q like x, float32 scale [..., K / group_size])."""
    torch._check(x.shape[-1] % group_size == 0, lambda: f"K={x.shape[-1]} is not a multiple of the group size {group_size}")
    groups = x.float().unflatten(-1, (-1, group_size))
    scale = fp8_scale(groups.abs().amax(dim=-1), scale_ub)
    return saturate_to_fp8(groups, scale.unsqueeze(-1)).flatten(-2), scale


def quantize_fp8_blockwise_weight(w: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Quantize w [..., N, K] (experts: [E, N, K], each expert on its own) in (block_n, block_k) blocks:
    (w_q [..., N, K], float32 scale [..., N / block_n, K / block_k])."""
    *lead, n, k = w.shape
    block_n, block_k = block
    blocks = w.float().reshape(*lead, n // block_n, block_n, k // block_k, block_k)
    scale = fp8_scale(blocks.abs().amax(dim=(-3, -1)))
    w_q = saturate_to_fp8(blocks, scale[..., :, None, :, None]).reshape(w.shape)
    return w_q, scale


def block_sizes(w_q: Tensor, w_scale: Tensor) -> tuple[int, int]:
    """(block_n, block_k) implied by a weight [..., N, K] and its block scales [..., N / block_n, K / block_k]
    (one weight, or the experts' [E, ...])."""
    return w_q.shape[-2] // w_scale.shape[-2], w_q.shape[-1] // w_scale.shape[-1]


def _check(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    op = "fxquant::fp8_blockwise_linear"
    torch._check(w_scale.dim() == 2, lambda: f"{op}: weight scale must be [N / block_n, K / block_k], got {list(w_scale.shape)}")
    n, k = w_q.shape
    torch._check(
        n % w_scale.shape[0] == 0 and k % w_scale.shape[1] == 0,
        lambda: f"{op}: weight [{n}, {k}] is not a whole number of {list(w_scale.shape)} blocks",
    )
    check_linear_inputs(op, x, w_q, w_scale, tuple(w_scale.shape), bias)


@torch.library.custom_op("fxquant::quantize_fp8_per_group", mutates_args=())
def quantize_fp8_per_group(x: Tensor, group_size: int, scale_ub: float | None = None) -> tuple[Tensor, Tensor]:
    """Dynamic per-token, per-group e4m3 quantization."""
    return quantize_fp8_groupwise(x, group_size, scale_ub)


@quantize_fp8_per_group.register_fake
def _(x: Tensor, group_size: int, scale_ub: float | None = None) -> tuple[Tensor, Tensor]:
    torch._check(x.shape[-1] % group_size == 0, lambda: f"K={x.shape[-1]} is not a multiple of the group size {group_size}")
    scale_shape = (*x.shape[:-1], x.shape[-1] // group_size)
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty(scale_shape, dtype=torch.float32)


def blockwise_gemm_reference(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """sum over K-blocks of (x_q · w_q in float32) * x_scale[m, kb] * w_scale[n // block_n, kb]: [M, N] float32."""
    block_n, block_k = block_sizes(w_q, w_scale)
    w_scale_rows = w_scale.repeat_interleave(block_n, dim=0)  # [N, K / block_k]
    acc = x_q.new_zeros((x_q.shape[0], w_q.shape[0]), dtype=torch.float32)
    for kb in range(w_scale.shape[1]):
        columns = slice(kb * block_k, (kb + 1) * block_k)
        partial = x_q[:, columns].float() @ w_q[:, columns].float().t()  # exact: fp8 products, short sums
        acc += partial * x_scale[:, kb : kb + 1] * w_scale_rows[:, kb]
    return acc


@torch.library.custom_op("fxquant::fp8_blockwise_mm", mutates_args=())
def fp8_blockwise_mm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    """bf16 [M, N] = blockwise-scaled x_q [M, K] @ w_q [N, K].T; x_scale [M, K / block_k] (one per
    token per group), w_scale [N / block_n, K / block_k]. The GEMM alone, on operands already
    quantized (what the Inductor lowering of fp8_blockwise_linear leaves). CPU: the reference."""
    return blockwise_gemm_reference(x_q, x_scale, w_q, w_scale).to(torch.bfloat16)


def _fp8_blockwise_mm_cuda(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    from fxquant.kernels.fp8_blockwise_gemm import (
        fp8_blockwise_gemm,  # triton: GPU machines only
    )
    from fxquant.ops.cublas_blockwise import (
        cublas_blockwise_fits,
        cublas_blockwise_mm,
        cublas_blockwise_works,
    )

    if cublas_blockwise_fits(x_q, w_q, w_scale) and cublas_blockwise_works(x_q.device):
        return cublas_blockwise_mm(x_q, x_scale, w_q, w_scale)
    return fp8_blockwise_gemm(x_q, x_scale, w_q, w_scale, *block_sizes(w_q, w_scale))


fp8_blockwise_mm.register_kernel("cuda")(_fp8_blockwise_mm_cuda)


@fp8_blockwise_mm.register_fake
def _(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor) -> Tensor:
    return gemm_output("fxquant::fp8_blockwise_mm", x_q, w_q)


@torch.library.custom_op("fxquant::fp8_blockwise_linear", mutates_args=())
def fp8_blockwise_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None
) -> Tensor:
    """y = blockwise-scaled e4m3 GEMM of x (quantized per token per block_k group) and w_q, + bias."""
    _check(x, w_q, w_scale, bias)
    _, block_k = block_sizes(w_q, w_scale)
    x_q, x_scale = quantize_fp8_groupwise(x.reshape(-1, x.shape[-1]), block_k, scale_ub)
    return dequantized_epilogue(blockwise_gemm_reference(x_q, x_scale, w_q, w_scale), None, None, bias, x)


@fp8_blockwise_linear.register_kernel("cuda")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None) -> Tensor:
    _check(x, w_q, w_scale, bias)
    reason = fp8_unsupported_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"fxquant::fp8_blockwise_linear: {reason}; use scheme='int8'")
    _, block_k = block_sizes(w_q, w_scale)
    x_q, x_scale = quantize_fp8_groupwise(x.reshape(-1, x.shape[-1]), block_k, scale_ub)
    y = _fp8_blockwise_mm_cuda(x_q, x_scale, w_q, w_scale)
    return bf16_gemm_epilogue(y, bias, x)


@fp8_blockwise_linear.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None) -> Tensor:
    _check(x, w_q, w_scale, bias)
    return linear_output(x, w_q)


register_inference_only_autograd(fp8_blockwise_linear, "fxquant::fp8_blockwise_linear")
