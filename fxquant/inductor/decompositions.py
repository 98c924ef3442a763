"""Open fxquant's FP8 ops up to Inductor: activation quantization as Inductor code, GEMM a choice.

    fp8_rowwise_linear(x, w_q, w_scale, bias, ub)
      → amax = max(|x|) per row; scale = amax / 448; x_q = e4m3(x / scale)   (reduction + pointwise)
      → fxquant::fp8_rowwise_mm(x_q, w_q, scale, w_scale) (+ bias)            (fxquant's GEMM lowering)
    fp8_blockwise_linear(...)
      → amax per token per block_k group, the cast                            (reduction + pointwise)
      → fxquant::fp8_blockwise_mm(x_q, scale, w_q, w_scale) (+ bias)          (an extern call: cuBLAS or Triton)
    fp8_tensorwise_linear(...)
      → amax of the whole tensor, the cast → _scaled_mm(tensorwise)           (Inductor's GEMM lowering)
    fp8_rowwise_grouped_mm(x, w_q, w_scale, offsets, ub, rows)                (MoE experts)
      → the rowwise quantization, as for a linear                            (reduction + pointwise)
      → with rows: the codes and scales of x's rows `rows`                    (pointwise gather)
      → fxquant::fp8_rowwise_grouped_gemm(x_q, w_q, scale, w_scale, offsets)  (fxquant's grouped GEMM lowering)
      → rows past offsets[-1] set to 0, the cast                              (pointwise, fused into the consumer)
    fp8_rowwise_batched_mm(x, w_q, w_scale, expert_ids, ub)
      → the quantization, the rows ordered by expert (sort, counts, running sum: all on the device)
      → the same grouped GEMM, the results gathered back to their rows
    fp8_blockwise_grouped_mm, fp8_blockwise_batched_mm                        (MoE experts)
      → as fp8_rowwise's, with the per-group quantization of fp8_blockwise_linear and
        fxquant::fp8_blockwise_grouped_gemm(x_q, scale, w_q, w_scale, offsets) (an extern call: Triton)

Inductor then fuses the amax reduction and the cast into the kernel that produces x (RMSNorm,
SiLU·mul, a residual add), so no separate quantization kernel runs. fp8_rowwise_mm lowers to
fxquant's choice of GEMMs (fxquant/inductor/fp8_rowwise_mm.py: our Triton template, FBGEMM,
cuBLAS), with the bias add and the cast fused into the template's epilogue. The quantization is
the reference's, so numerics match the CPU reference and FBGEMM's quantizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.inductor import fp8_rowwise_grouped_mm, fp8_rowwise_mm  # noqa: F401  (register the GEMMs' lowerings)
from fxquant.ops import fp8_blockwise_experts
from fxquant.ops.expert_rows import gathered
from fxquant.ops.fp8_blockwise import block_sizes, quantize_fp8_groupwise
from fxquant.ops.fp8_common import saturate_to_fp8
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.fp8_rowwise_experts import batched_mm_of_quantized, grouped_mm_of_quantized
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from fxquant.ops.linear_common import bf16_gemm_epilogue


def fp8_rowwise_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None
) -> Tensor:
    """fxquant::fp8_rowwise_linear as aten ops Inductor fuses, and fxquant's GEMM op it tunes."""
    x_q, x_scale = quantize_fp8_rowwise(x.reshape(-1, x.shape[-1]), scale_ub)
    return bf16_gemm_epilogue(torch.ops.fxquant.fp8_rowwise_mm(x_q, w_q, x_scale, w_scale), bias, x)


def fp8_rowwise_grouped_mm(
    x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None, rows: Tensor | None = None
) -> Tensor:
    """fxquant::fp8_rowwise_grouped_mm: the per-row quantization as aten ops Inductor fuses into x's
    producer (SiLU·mul, RMSNorm, the gather of the rows by expert), the codes' gather with `rows`,
    then fxquant's grouped GEMM op."""
    x_q, x_scale = gathered(rows, *quantize_fp8_rowwise(x, scale_ub))
    return grouped_mm_of_quantized(x_q, x_scale, w_q, w_scale, offsets, x.dtype)


def fp8_rowwise_batched_mm(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    """fxquant::fp8_rowwise_batched_mm: the quantization Inductor fuses, the rows ordered by expert, the grouped GEMM."""
    x_q, x_scale = quantize_fp8_rowwise(x, scale_ub)
    return batched_mm_of_quantized(x_q, x_scale, w_q, w_scale, expert_ids, x.dtype)


def fp8_blockwise_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None
) -> Tensor:
    """fxquant::fp8_blockwise_linear: the per-group quantization as aten ops Inductor fuses, then
    fxquant's blockwise GEMM op (which picks cuBLAS or its Triton kernel at run time)."""
    _, block_k = block_sizes(w_q, w_scale)
    x_q, x_scale = quantize_fp8_groupwise(x.reshape(-1, x.shape[-1]), block_k, scale_ub)
    return bf16_gemm_epilogue(torch.ops.fxquant.fp8_blockwise_mm(x_q, x_scale, w_q, w_scale), bias, x)


def fp8_blockwise_grouped_mm(
    x: Tensor, w_q: Tensor, w_scale: Tensor, offsets: Tensor, scale_ub: float | None = None, rows: Tensor | None = None
) -> Tensor:
    """fxquant::fp8_blockwise_grouped_mm: the per-token per-group quantization as aten ops Inductor fuses
    into x's producer (SiLU·mul, RMSNorm, the gather of the rows by expert), the codes' gather with
    `rows`, then fxquant's blockwise grouped GEMM op."""
    x_q, x_scale = gathered(rows, *fp8_blockwise_experts.quantize_rows(x, w_q, w_scale, scale_ub))
    return fp8_blockwise_experts.grouped_mm_of_quantized(x_q, x_scale, w_q, w_scale, offsets, x.dtype)


def fp8_blockwise_batched_mm(x: Tensor, w_q: Tensor, w_scale: Tensor, expert_ids: Tensor, scale_ub: float | None = None) -> Tensor:
    """fxquant::fp8_blockwise_batched_mm: the quantization Inductor fuses, the rows ordered by expert, the grouped GEMM."""
    x_q, x_scale = fp8_blockwise_experts.quantize_rows(x, w_q, w_scale, scale_ub)
    return fp8_blockwise_experts.batched_mm_of_quantized(x_q, x_scale, w_q, w_scale, expert_ids, x.dtype)


def _tensorwise_gemm(x: Tensor, x_q: Tensor, w_q: Tensor, output_scale: Tensor, bias: Tensor | None) -> Tensor:
    y = torch._scaled_mm(
        x_q, w_q.t(), scale_a=output_scale, scale_b=torch.ones_like(output_scale),
        out_dtype=torch.bfloat16, use_fast_accum=True,
    )
    return bf16_gemm_epilogue(y, bias, x)


def fp8_tensorwise_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None
) -> Tensor:
    """fxquant::fp8_tensorwise_linear: a whole-tensor amax reduction, the cast, a tensorwise _scaled_mm."""
    x_q, x_scale = quantize_fp8_tensorwise(x.reshape(-1, x.shape[-1]), scale_ub)
    return _tensorwise_gemm(x, x_q, w_q, x_scale * w_scale, bias)


def fp8_tensorwise_static_linear(x: Tensor, w_q: Tensor, output_scale: float, bias: Tensor | None, x_scale: float) -> Tensor:
    """fxquant::fp8_tensorwise_static_linear: a pointwise cast (fused into x's producer), a _scaled_mm."""
    x_q = saturate_to_fp8(x.reshape(-1, x.shape[-1]), x_scale)
    return _tensorwise_gemm(x, x_q, w_q, x.new_full((), output_scale, dtype=torch.float32), bias)
