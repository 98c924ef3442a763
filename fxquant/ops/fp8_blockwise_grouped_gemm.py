"""The grouped GEMM of fp8_blockwise's expert ops, on operands already quantized, and its CUDA kernel.

    fp8_blockwise_grouped_gemm(x_q [S, K] e4m3, x_scale [S, K / bk], w_q [E, N, K] e4m3,
                               w_scale [E, N / bn, K / bk], offsets [E] int32)
        → bf16 [S, N]: the rows of group g (offsets[g-1] <= s < offsets[g]) times expert g, each K-block's
          exact e4m3 products summed in float32, scaled by that block's activation and weight scales and
          added up block after block; rows past offsets[-1] are unspecified on CUDA (0 here)

What the expert ops' CUDA implementations and their Inductor decompositions leave once the activation
quantization is done (fxquant/ops/fp8_blockwise_experts.py, fxquant/inductor/decompositions.py), as
fxquant::fp8_rowwise_grouped_gemm is for fp8_rowwise. The block (bn, bk) is read off the shapes. On
CUDA: fxquant's blockwise grouped Triton kernel (fxquant/kernels/fp8_blockwise_grouped_gemm.py), which
finds each tile's group on the device (no host sync: CUDA graphs); Inductor calls the op as it stands.
The reference, here, is also the expert ops' (on any device): a row finds its expert with
`searchsorted` on the offsets, and rows are gathered with their experts' weights `ROWS_PER_GATHER` at
a time, so memory stays bounded by that many [N, K] float weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.availability import fp8_unsupported_reason
from fxquant.ops.fp8_blockwise import block_sizes
from fxquant.ops.fp8_common import FP8_DTYPE

OP = "fxquant::fp8_blockwise_grouped_gemm"
ROWS_PER_GATHER = 64


def rows_times_experts(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, experts: Tensor) -> Tensor:
    """Row s of x_q times expert experts[s] (in range), blockwise-scaled: float32 [S, N]."""
    block_n, block_k = block_sizes(w_q, w_scale)
    acc = x_q.new_zeros((x_q.shape[0], w_q.shape[1]), dtype=torch.float32)
    for start in range(0, x_q.shape[0], ROWS_PER_GATHER):
        rows = slice(start, start + ROWS_PER_GATHER)
        ids = experts[rows]
        weights = w_q[ids].float()  # [rows, N, K]: exact e4m3 values
        scales = w_scale[ids].repeat_interleave(block_n, dim=1)  # [rows, N, K / block_k]
        for kb in range(w_scale.shape[2]):
            columns = slice(kb * block_k, (kb + 1) * block_k)
            partial = torch.bmm(weights[:, :, columns], x_q[rows, columns].float().unsqueeze(-1)).squeeze(-1)
            acc[rows] += partial * x_scale[rows, kb : kb + 1] * scales[:, :, kb]
    return acc


def grouped_rows_times_experts(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    """The rows of group g times expert g, blockwise-scaled, for cumulative `offsets` [E]: float32 [S, N],
    0 past offsets[-1]."""
    experts = w_q.shape[0]
    group = torch.searchsorted(offsets, torch.arange(x_q.shape[0], device=offsets.device, dtype=offsets.dtype), right=True)
    acc = rows_times_experts(x_q, x_scale, w_q, w_scale, group.long().clamp(max=experts - 1))
    return torch.where((group < experts).unsqueeze(-1), acc, 0.0)


def _check(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor) -> None:
    torch._check(x_q.dim() == 2 and x_q.dtype == FP8_DTYPE, lambda: f"{OP}: x_q must be {FP8_DTYPE} [S, K]")
    torch._check(w_q.dim() == 3 and w_q.dtype == FP8_DTYPE, lambda: f"{OP}: w_q must be {FP8_DTYPE} [E, N, K]")
    torch._check(x_q.shape[1] == w_q.shape[2], lambda: f"{OP}: x_q has K={x_q.shape[1]}, w_q is [E, N, K={w_q.shape[2]}]")
    torch._check(
        w_scale.dtype == torch.float32 and w_scale.dim() == 3 and w_scale.shape[0] == w_q.shape[0]
        and w_q.shape[1] % w_scale.shape[1] == 0 and w_q.shape[2] % w_scale.shape[2] == 0,
        lambda: f"{OP}: w_scale must be float32 [E, N / block_n, K / block_k] of whole blocks, got {w_scale.dtype} "
                f"{list(w_scale.shape)} for w_q {list(w_q.shape)}",
    )
    torch._check(
        x_scale.dtype == torch.float32 and tuple(x_scale.shape) == (x_q.shape[0], w_scale.shape[2]),
        lambda: f"{OP}: x_scale must be float32 [S={x_q.shape[0]}, K / block_k={w_scale.shape[2]}], got {list(x_scale.shape)}",
    )
    torch._check(offsets.dim() == 1 and offsets.shape[0] == w_q.shape[0] and not offsets.is_floating_point(),
                 lambda: f"{OP}: offsets must be 1-D integer [E={w_q.shape[0]}]")


@torch.library.custom_op(OP, mutates_args=())
def fp8_blockwise_grouped_gemm(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    """The grouped GEMM (reference implementation, any device; rows past offsets[-1] are 0)."""
    _check(x_q, x_scale, w_q, w_scale, offsets)
    return grouped_rows_times_experts(x_q, x_scale, w_q, w_scale, offsets).to(torch.bfloat16)


@fp8_blockwise_grouped_gemm.register_kernel("cuda")
def _(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    from fxquant.kernels.fp8_blockwise_grouped_gemm import fp8_blockwise_grouped_gemm as triton_kernel  # triton: GPU machines only

    _check(x_q, x_scale, w_q, w_scale, offsets)
    reason = fp8_unsupported_reason(x_q.device)
    if reason is not None:
        raise RuntimeError(f"{OP}: {reason}")
    return triton_kernel(x_q, x_scale, w_q, w_scale, offsets)


@fp8_blockwise_grouped_gemm.register_fake
def _(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    _check(x_q, x_scale, w_q, w_scale, offsets)
    return x_q.new_empty((x_q.shape[0], w_q.shape[1]), dtype=torch.bfloat16)
