"""fp8_rowwise on expert weights: the batched and grouped forms of fxquant::fp8_rowwise_linear.

    fp8_rowwise_batched_mm(x [S, K], w_q [E, N, K], w_scale [E, N], expert_ids [S])  → y [S, N]
        y[s] = x_q[s] · w_q[expert_ids[s]] * x_scale[s] * w_scale[expert_ids[s]]
    fp8_rowwise_grouped_mm(x [S, K], w_q [E, N, K], w_scale [E, N], offsets [E] int32, scale_ub, rows) → y [S, N]
        the rows of group g, offsets[g-1] <= s < offsets[g], times expert g; rows past offsets[-1] are 0;
        with rows [S] (x [T, K]): the op's rows are x[rows], quantized before they are gathered
        (a row's codes are its own: exact), so the tokens' quantization fuses into the kernel that
        makes them (RMSNorm) and the gather moves e4m3 codes (passes/quantize_before_gather.py)

x is quantized per row (token) as the dense op does (fxquant/ops/fp8_rowwise.py). The CPU
implementation is the reference: exact e4m3 products accumulated in float32, the scales applied after
the sum, in x's dtype. On CUDA both quantize x (FBGEMM's quantizer where it imports) and run an FP8
grouped GEMM (fxquant::fp8_rowwise_grouped_gemm, fxquant/ops/fp8_rowwise_grouped_gemm.py); the batched
form first orders its rows by expert, on the device, and puts the results back in row order, so
neither reads anything back to the host (CUDA graphs). Compiled, Inductor sees the same steps
(fxquant/inductor/decompositions.py), with the quantization fused into x's producer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.availability import fp8_unsupported_reason
from fxquant.ops.expert_rows import batched_as_grouped, check_gather, gathered, rows_in_groups
from fxquant.ops.fp8_common import FP8_DTYPE
from fxquant.ops.fp8_rowwise import _quantize_fp8_rowwise_cuda, quantize_fp8_rowwise
from fxquant.ops.fp8_rowwise_grouped_gemm import fp8_rowwise_grouped_gemm
from fxquant.ops.linear_common import FLOAT_DTYPES, register_inference_only_autograd


def check_expert_inputs(op: str, x: Tensor, w_q: Tensor, w_scale: Tensor, rows: Tensor, rows_name: str,
                        gather: Tensor | None = None) -> None:
    """Shape and dtype checks shared by the fake and the real implementations (`gather`: a grouped op's rows of x)."""
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{op}: activation dtype {x.dtype} unsupported; want {FLOAT_DTYPES}")
    torch._check(x.dim() == 2, lambda: f"{op}: activation must be 2-D [S, K], got {tuple(x.shape)}")
    torch._check(w_q.dim() == 3 and w_q.dtype == FP8_DTYPE, lambda: f"{op}: weight must be {FP8_DTYPE} [E, N, K], got {w_q.dtype} {tuple(w_q.shape)}")
    torch._check(x.shape[1] == w_q.shape[2], lambda: f"{op}: activation has K={x.shape[1]} but the weight is [E, N, K={w_q.shape[2]}]")
    torch._check(
        w_scale.dtype == torch.float32 and tuple(w_scale.shape) == tuple(w_q.shape[:2]),
        lambda: f"{op}: weight scale must be float32 {list(w_q.shape[:2])}, got {w_scale.dtype} {list(w_scale.shape)}",
    )
    torch._check(rows.dim() == 1 and not rows.is_floating_point(), lambda: f"{op}: {rows_name} must be a 1-D integer tensor")
    check_gather(op, gather)


def grouped_mm_of_quantized(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, dtype) -> Tensor:
    """fp8_rowwise_grouped_mm once x is quantized: the grouped GEMM, its rows past the groups zeroed, in `dtype`."""
    y = fp8_rowwise_grouped_gemm(x_q, w_q, x_scale, w_scale, offsets.to(torch.int32))
    return rows_in_groups(y, offsets).to(dtype)


def batched_mm_of_quantized(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, dtype) -> Tensor:
    """fp8_rowwise_batched_mm once x is quantized, as the grouped GEMM on the rows ordered by expert
    (fxquant/ops/expert_rows.py), in `dtype`."""
    def grouped_gemm(x_q: Tensor, x_scale: Tensor, offsets: Tensor) -> Tensor:
        return fp8_rowwise_grouped_gemm(x_q, w_q, x_scale, w_scale, offsets)

    return batched_as_grouped(grouped_gemm, x_q, x_scale, expert_ids, w_q.shape[0]).to(dtype)


def _check_fp8_device(op: str, x: Tensor) -> None:
    reason = fp8_unsupported_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"{op}: {reason}")


def _expert_output(x: Tensor, w_q: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w_q.shape[1]))


@torch.library.custom_op("fxquant::fp8_rowwise_batched_mm", mutates_args=())
def fp8_rowwise_batched_mm(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    """Row s of x times expert expert_ids[s], FP8 rowwise (reference implementation, any device)."""
    check_expert_inputs("fxquant::fp8_rowwise_batched_mm", x, w_q, w_scale, expert_ids, "expert_ids")
    x_q, x_scale = quantize_fp8_rowwise(x, scale_ub)
    acc = torch.bmm(w_q[expert_ids].float(), x_q.float().unsqueeze(-1)).squeeze(-1)  # exact products, float32 sums
    return (acc * x_scale.unsqueeze(-1) * w_scale[expert_ids]).to(x.dtype)


@fp8_rowwise_batched_mm.register_kernel("cuda")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    check_expert_inputs("fxquant::fp8_rowwise_batched_mm", x, w_q, w_scale, expert_ids, "expert_ids")
    _check_fp8_device("fxquant::fp8_rowwise_batched_mm", x)
    x_q, x_scale = _quantize_fp8_rowwise_cuda(x, scale_ub)
    return batched_mm_of_quantized(x_q, x_scale, w_q, w_scale, expert_ids, x.dtype)


@fp8_rowwise_batched_mm.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    check_expert_inputs("fxquant::fp8_rowwise_batched_mm", x, w_q, w_scale, expert_ids, "expert_ids")
    return _expert_output(x, w_q)


@torch.library.custom_op("fxquant::fp8_rowwise_grouped_mm", mutates_args=())
def fp8_rowwise_grouped_mm(
    x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None, rows: Tensor | None = None
) -> Tensor:
    """The rows of each expert's group (x's, or x[rows]) times that expert, FP8 rowwise (reference implementation, any device)."""
    check_expert_inputs("fxquant::fp8_rowwise_grouped_mm", x, w_q, w_scale, offsets, "offsets", rows)
    (x,) = gathered(rows, x)
    x_q, x_scale = quantize_fp8_rowwise(x, scale_ub)
    acc = x.new_zeros((x.shape[0], w_q.shape[1]), dtype=torch.float32)
    row_scale = torch.zeros_like(acc)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        end = min(end, x.shape[0])
        if end > start:
            acc[start:end] = x_q[start:end].float() @ w_q[expert].float().t()
            row_scale[start:end] = w_scale[expert]
        start = max(start, end)
    return (acc * x_scale.unsqueeze(-1) * row_scale).to(x.dtype)


@fp8_rowwise_grouped_mm.register_kernel("cuda")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None, rows: Tensor | None = None) -> Tensor:
    check_expert_inputs("fxquant::fp8_rowwise_grouped_mm", x, w_q, w_scale, offsets, "offsets", rows)
    _check_fp8_device("fxquant::fp8_rowwise_grouped_mm", x)
    x_q, x_scale = gathered(rows, *_quantize_fp8_rowwise_cuda(x, scale_ub))
    return grouped_mm_of_quantized(x_q, x_scale, w_q, w_scale, offsets, x.dtype)


@fp8_rowwise_grouped_mm.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None, rows: Tensor | None = None) -> Tensor:
    check_expert_inputs("fxquant::fp8_rowwise_grouped_mm", x, w_q, w_scale, offsets, "offsets", rows)
    return x.new_empty((x.shape[0] if rows is None else rows.shape[0], w_q.shape[1]))


register_inference_only_autograd(fp8_rowwise_batched_mm, "fxquant::fp8_rowwise_batched_mm")
register_inference_only_autograd(fp8_rowwise_grouped_mm, "fxquant::fp8_rowwise_grouped_mm")
