"""fp8_blockwise on expert weights: the batched and grouped forms of fxquant::fp8_blockwise_linear.

    fp8_blockwise_batched_mm(x [S, K], w_q [E, N, K], w_scale [E, N / bn, K / bk], expert_ids [S]) → y [S, N]
        y[s] = sum over K-blocks kb of (x_q[s, kb] · w_q[e, :, kb]) * x_scale[s, kb] * w_scale[e, :, kb],  e = expert_ids[s]
    fp8_blockwise_grouped_mm(x [S, K], w_q [E, N, K], w_scale [E, N / bn, K / bk], offsets [E] int32, scale_ub, rows) → y [S, N]
        the rows of group g, offsets[g-1] <= s < offsets[g], times expert g; rows past offsets[-1] are 0;
        with rows [S] (x [T, K]): the op's rows are x[rows], quantized before they are gathered
        (as fp8_rowwise_grouped_mm's, fxquant/ops/fp8_rowwise_experts.py)

The block (bn, bk) is read off the shapes, as the dense op reads it; x is quantized per token per
bk-wide group of channels, as the dense op does (fxquant/ops/fp8_blockwise.py), and each K-block's
exact e4m3 products are summed in float32, scaled by that block's activation and weight scales and
added up block after block, as the dense reference does. The CPU implementation is the reference
(that of the grouped GEMM op, fxquant/ops/fp8_blockwise_grouped_gemm.py), in x's dtype. On CUDA both
quantize x and run the grouped GEMM op (fxquant's blockwise grouped Triton kernel); the batched form
first orders its rows by expert, on the device, and puts the results back in row order
(fxquant/ops/expert_rows.py), so neither reads anything back to the host (CUDA graphs). Compiled,
Inductor sees the same steps (fxquant/inductor/decompositions.py), with the quantization fused into
x's producer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.expert_rows import batched_as_grouped, check_gather, gathered, rows_in_groups
from fxquant.ops.fp8_blockwise import block_sizes, quantize_fp8_groupwise
from fxquant.ops.fp8_blockwise_grouped_gemm import fp8_blockwise_grouped_gemm, grouped_rows_times_experts, rows_times_experts
from fxquant.ops.fp8_common import FP8_DTYPE
from fxquant.ops.linear_common import FLOAT_DTYPES, register_inference_only_autograd


def check_blockwise_expert_inputs(op: str, x: Tensor, w_q: Tensor, w_scale: Tensor, rows: Tensor, rows_name: str,
                                  gather: Tensor | None = None) -> None:
    """Shape and dtype checks shared by the fake and the real implementations (`gather`: a grouped op's rows of x)."""
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{op}: activation dtype {x.dtype} unsupported; want {FLOAT_DTYPES}")
    torch._check(x.dim() == 2, lambda: f"{op}: activation must be 2-D [S, K], got {tuple(x.shape)}")
    torch._check(w_q.dim() == 3 and w_q.dtype == FP8_DTYPE, lambda: f"{op}: weight must be {FP8_DTYPE} [E, N, K], got {w_q.dtype} {tuple(w_q.shape)}")
    torch._check(x.shape[1] == w_q.shape[2], lambda: f"{op}: activation has K={x.shape[1]} but the weight is [E, N, K={w_q.shape[2]}]")
    torch._check(
        w_scale.dtype == torch.float32 and w_scale.dim() == 3 and w_scale.shape[0] == w_q.shape[0],
        lambda: f"{op}: weight scale must be float32 [E={w_q.shape[0]}, N / block_n, K / block_k], got {w_scale.dtype} {list(w_scale.shape)}",
    )
    torch._check(
        w_q.shape[1] % w_scale.shape[1] == 0 and w_q.shape[2] % w_scale.shape[2] == 0,
        lambda: f"{op}: weight {list(w_q.shape)} is not a whole number of {list(w_scale.shape[1:])} blocks per expert",
    )
    torch._check(rows.dim() == 1 and not rows.is_floating_point(), lambda: f"{op}: {rows_name} must be a 1-D integer tensor")
    check_gather(op, gather)


def quantize_rows(x: Tensor, w_q: Tensor, w_scale: Tensor, scale_ub: float | None) -> tuple[Tensor, Tensor]:
    """x [S, K] quantized per token per block_k group of the weight's blocks: (x_q e4m3, x_scale [S, K / block_k])."""
    return quantize_fp8_groupwise(x, block_sizes(w_q, w_scale)[1], scale_ub)


def grouped_mm_of_quantized(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, dtype) -> Tensor:
    """fp8_blockwise_grouped_mm once x is quantized: the grouped GEMM, its rows past the groups zeroed, in `dtype`."""
    y = fp8_blockwise_grouped_gemm(x_q, x_scale, w_q, w_scale, offsets.to(torch.int32))
    return rows_in_groups(y, offsets).to(dtype)


def batched_mm_of_quantized(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, dtype) -> Tensor:
    """fp8_blockwise_batched_mm once x is quantized, as the grouped GEMM on the rows ordered by expert
    (fxquant/ops/expert_rows.py), in `dtype`."""
    def grouped_gemm(x_q: Tensor, x_scale: Tensor, offsets: Tensor) -> Tensor:
        return fp8_blockwise_grouped_gemm(x_q, x_scale, w_q, w_scale, offsets)

    return batched_as_grouped(grouped_gemm, x_q, x_scale, expert_ids, w_q.shape[0]).to(dtype)


@torch.library.custom_op("fxquant::fp8_blockwise_batched_mm", mutates_args=())
def fp8_blockwise_batched_mm(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    """Row s of x times expert expert_ids[s], FP8 blockwise (reference implementation, any device)."""
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_batched_mm", x, w_q, w_scale, expert_ids, "expert_ids")
    x_q, x_scale = quantize_rows(x, w_q, w_scale, scale_ub)
    return rows_times_experts(x_q, x_scale, w_q, w_scale, expert_ids.long()).to(x.dtype)


@fp8_blockwise_batched_mm.register_kernel("cuda")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_batched_mm", x, w_q, w_scale, expert_ids, "expert_ids")
    x_q, x_scale = quantize_rows(x, w_q, w_scale, scale_ub)
    return batched_mm_of_quantized(x_q, x_scale, w_q, w_scale, expert_ids, x.dtype)


@fp8_blockwise_batched_mm.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_batched_mm", x, w_q, w_scale, expert_ids, "expert_ids")
    return x.new_empty((x.shape[0], w_q.shape[1]))


@torch.library.custom_op("fxquant::fp8_blockwise_grouped_mm", mutates_args=())
def fp8_blockwise_grouped_mm(
    x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None, rows: Tensor | None = None
) -> Tensor:
    """The rows of each expert's group (x's, or x[rows]) times that expert, FP8 blockwise (reference implementation, any device)."""
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_grouped_mm", x, w_q, w_scale, offsets, "offsets", rows)
    (x,) = gathered(rows, x)
    x_q, x_scale = quantize_rows(x, w_q, w_scale, scale_ub)
    return grouped_rows_times_experts(x_q, x_scale, w_q, w_scale, offsets).to(x.dtype)


@fp8_blockwise_grouped_mm.register_kernel("cuda")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None, rows: Tensor | None = None) -> Tensor:
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_grouped_mm", x, w_q, w_scale, offsets, "offsets", rows)
    x_q, x_scale = gathered(rows, *quantize_rows(x, w_q, w_scale, scale_ub))
    return grouped_mm_of_quantized(x_q, x_scale, w_q, w_scale, offsets, x.dtype)


@fp8_blockwise_grouped_mm.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None, rows: Tensor | None = None) -> Tensor:
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_grouped_mm", x, w_q, w_scale, offsets, "offsets", rows)
    return x.new_empty((x.shape[0] if rows is None else rows.shape[0], w_q.shape[1]))


register_inference_only_autograd(fp8_blockwise_batched_mm, "fxquant::fp8_blockwise_batched_mm")
register_inference_only_autograd(fp8_blockwise_grouped_mm, "fxquant::fp8_blockwise_grouped_mm")
