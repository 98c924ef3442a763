"""fp8_blockwise on expert weights: the batched and grouped forms of fxquant::fp8_blockwise_linear.

    fp8_blockwise_batched_mm(x [S, K], w_q [E, N, K], w_scale [E, N / bn, K / bk], expert_ids [S]) → y [S, N]
        y[s] = sum over K-blocks kb of (x_q[s, kb] · w_q[e, :, kb]) * x_scale[s, kb] * w_scale[e, :, kb],  e = expert_ids[s]
    fp8_blockwise_grouped_mm(x [S, K], w_q [E, N, K], w_scale [E, N / bn, K / bk], offsets [E] int32) → y [S, N]
        the rows of group g, offsets[g-1] <= s < offsets[g], times expert g; rows past offsets[-1] are 0

The block (bn, bk) is read off the shapes, as the dense op reads it; x is quantized per token per
bk-wide group of channels, as the dense op does (fxquant/ops/fp8_blockwise.py), and each K-block's
exact e4m3 products are summed in float32, scaled by that block's activation and weight scales and
added up block after block, as the dense reference does. The grouped op runs fxquant's blockwise
grouped Triton kernel on CUDA; otherwise one implementation for every device, with no host
synchronisation: a grouped row finds its expert with `searchsorted` on the offsets (device
side), and rows are gathered with their experts' weights `ROWS_PER_GATHER` at a time, so memory stays
bounded by that many [N, K] float weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.fp8_blockwise import quantize_fp8_groupwise
from fxquant.ops.fp8_common import FP8_DTYPE
from fxquant.ops.linear_common import FLOAT_DTYPES, register_inference_only_autograd

ROWS_PER_GATHER = 64


def check_blockwise_expert_inputs(op: str, x: Tensor, w_q: Tensor, w_scale: Tensor, rows: Tensor, rows_name: str) -> None:
    """Shape and dtype checks shared by the fake and the real implementations."""
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


def _rows_times_experts(x: Tensor, w_q: Tensor, w_scale: Tensor, experts: Tensor, scale_ub: float | None) -> Tensor:
    """Row s of x times expert experts[s] (in range), blockwise-scaled: float32 [S, N]."""
    block_n, block_k = w_q.shape[1] // w_scale.shape[1], w_q.shape[2] // w_scale.shape[2]
    x_q, x_scale = quantize_fp8_groupwise(x, block_k, scale_ub)
    acc = x.new_zeros((x.shape[0], w_q.shape[1]), dtype=torch.float32)
    for start in range(0, x.shape[0], ROWS_PER_GATHER):
        rows = slice(start, start + ROWS_PER_GATHER)
        ids = experts[rows]
        weights = w_q[ids].float()  # [rows, N, K]: exact e4m3 values
        scales = w_scale[ids].repeat_interleave(block_n, dim=1)  # [rows, N, K / block_k]
        for kb in range(w_scale.shape[2]):
            columns = slice(kb * block_k, (kb + 1) * block_k)
            partial = torch.bmm(weights[:, :, columns], x_q[rows, columns].float().unsqueeze(-1)).squeeze(-1)
            acc[rows] += partial * x_scale[rows, kb : kb + 1] * scales[:, :, kb]
    return acc


@torch.library.custom_op("fxquant::fp8_blockwise_batched_mm", mutates_args=())
def fp8_blockwise_batched_mm(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    """Row s of x times expert expert_ids[s], FP8 blockwise (reference implementation, any device)."""
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_batched_mm", x, w_q, w_scale, expert_ids, "expert_ids")
    return _rows_times_experts(x, w_q, w_scale, expert_ids.long(), scale_ub).to(x.dtype)


@fp8_blockwise_batched_mm.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_batched_mm", x, w_q, w_scale, expert_ids, "expert_ids")
    return x.new_empty((x.shape[0], w_q.shape[1]))


def group_of_rows(offsets: Tensor, rows: int) -> Tensor:
    """Each row's group for cumulative `offsets` [E] (E for the rows past the last group), on the device."""
    return torch.searchsorted(offsets, torch.arange(rows, device=offsets.device, dtype=offsets.dtype), right=True)


@torch.library.custom_op("fxquant::fp8_blockwise_grouped_mm", mutates_args=())
def fp8_blockwise_grouped_mm(x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None) -> Tensor:
    """The rows of each expert's group times that expert, FP8 blockwise (reference implementation, any device)."""
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_grouped_mm", x, w_q, w_scale, offsets, "offsets")
    group = group_of_rows(offsets, x.shape[0]).long()
    in_a_group = group < w_q.shape[0]
    acc = _rows_times_experts(x, w_q, w_scale, group.clamp(max=w_q.shape[0] - 1), scale_ub)
    return torch.where(in_a_group.unsqueeze(-1), acc, 0.0).to(x.dtype)


@fp8_blockwise_grouped_mm.register_kernel("cuda")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None) -> Tensor:
    """On CUDA: the activation quantized per token per block_k group, fxquant's blockwise grouped Triton
    kernel (fxquant/kernels/fp8_blockwise_grouped_gemm.py), the rows past the last group zeroed; nothing
    read back to the host."""
    from fxquant.kernels.fp8_blockwise_grouped_gemm import fp8_blockwise_grouped_gemm

    check_blockwise_expert_inputs("fxquant::fp8_blockwise_grouped_mm", x, w_q, w_scale, offsets, "offsets")
    x_q, x_scale = quantize_fp8_groupwise(x, w_q.shape[2] // w_scale.shape[2], scale_ub)
    y = fp8_blockwise_grouped_gemm(x_q, x_scale, w_q, w_scale, offsets)
    in_a_group = torch.arange(x.shape[0], device=x.device) < offsets[-1]
    return torch.where(in_a_group.unsqueeze(-1), y, 0.0).to(x.dtype)


@fp8_blockwise_grouped_mm.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None) -> Tensor:
    check_blockwise_expert_inputs("fxquant::fp8_blockwise_grouped_mm", x, w_q, w_scale, offsets, "offsets")
    return x.new_empty((x.shape[0], w_q.shape[1]))


register_inference_only_autograd(fp8_blockwise_batched_mm, "fxquant::fp8_blockwise_batched_mm")
register_inference_only_autograd(fp8_blockwise_grouped_mm, "fxquant::fp8_blockwise_grouped_mm")
