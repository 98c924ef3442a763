"""LLM.int8 (bitsandbytes' Linear8bitLt in inference): int8 weights per output channel, int8
activations per token, with the activation's outlier columns in 16-bit.

    outliers  = the columns of x where some |x| >= threshold (threshold 0: none)
    x_q       = round(x * 127 / rowmax) with outliers zeroed,  rowmax = max |x| over non-outlier entries
    y         = (x_q @ w_q.T) * rowmax * w_absmax / 127^2                    int32 accumulation
              + x[:, outliers] @ (w_q * w_absmax / 127)[:, outliers].T       in x's dtype
    w_q, w_absmax = round(W * 127 / max|W| per row), max|W| per row          from W in float16

The weight's quantization is bitsandbytes' (`int8_vectorwise_quant(W.half())`: its CB and SCB to the
bit). The activation is quantized from float32 where bitsandbytes first casts it to float16, so
outputs agree with bnb.matmul to float16 rounding of the activation (tests/ops/test_llm_int8.py).
The outlier product runs dense over all K with the other columns zeroed: static shapes, so the op
is captured by CUDA graphs, where bitsandbytes gathers the columns on the host's count. On CUDA the
scheme decomposes the op into these aten ops, so Inductor fuses the outlier split into the
activation's quantization and both into the kernels that produce x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.int8 import INT8_MAX, INT8_MIN_AMAX, int_mm
from fxquant.ops.linear_common import check_linear_inputs, linear_output, register_inference_only_autograd

INV_SCALE_SQUARED = 1.0 / (INT8_MAX * INT8_MAX)


def quantize_llm_int8_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(w_q int8 [N, K], w_absmax float32 [N]) as bitsandbytes' Int8Params: from the weight in float16."""
    half = weight.to(torch.float16)
    absmax = half.abs().amax(dim=-1).float()
    w_q = torch.round(half * (INT8_MAX / absmax.clamp(min=INT8_MIN_AMAX)).unsqueeze(-1)).to(torch.int8)
    return w_q, absmax


def split_outliers(x: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] → (x_q int8 [M, K], rowmax float32 [M], outlier column mask [K] bool)."""
    x = x.float()
    outlier = x.abs() >= threshold if threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
    columns = outlier.any(dim=0)
    inliers = x.masked_fill(outlier, 0)
    rowmax = inliers.abs().amax(dim=-1).clamp(min=INT8_MIN_AMAX)
    x_q = torch.round(inliers * (INT8_MAX / rowmax).unsqueeze(-1)).masked_fill(columns, 0).to(torch.int8)
    return x_q, rowmax, columns


def check_llm_int8_inputs(x: Tensor, w_q: Tensor, w_absmax: Tensor, bias: Tensor | None, threshold: float) -> None:
    check_linear_inputs("fxquant::llm_int8_linear", x, w_q, w_absmax, (w_q.shape[0],), bias)
    torch._check(threshold >= 0, lambda: f"fxquant::llm_int8_linear: threshold must be >= 0, got {threshold}")


def llm_int8_linear_aten(x: Tensor, w_q: Tensor, w_absmax: Tensor, bias: Tensor | None = None, threshold: float = 6.0) -> Tensor:
    """The op in aten ops: also its CUDA decomposition (the scheme's `decompositions`), where Inductor
    fuses the outlier split, the row max and the rounding into the kernels that produce x."""
    rows = x.reshape(-1, x.shape[-1])
    x_q, rowmax, columns = split_outliers(rows, threshold)
    y = int_mm(x_q, w_q.t()).float() * (rowmax.unsqueeze(-1) * w_absmax.unsqueeze(0)) * INV_SCALE_SQUARED
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if threshold > 0:
        weight = (w_q.float() * (w_absmax / INT8_MAX).unsqueeze(-1)).to(x.dtype)
        y = y + rows.masked_fill(~columns, 0) @ weight.t()
    return y.reshape(*x.shape[:-1], w_q.shape[0])


@torch.library.custom_op("fxquant::llm_int8_linear", mutates_args=())
def llm_int8_linear(x: Tensor, w_q: Tensor, w_absmax: Tensor, bias: Tensor | None = None, threshold: float = 6.0) -> Tensor:
    """y = int8 GEMM of the non-outlier columns + the outlier columns in x's dtype, + bias."""
    check_llm_int8_inputs(x, w_q, w_absmax, bias, threshold)
    return llm_int8_linear_aten(x, w_q, w_absmax, bias, threshold)


@llm_int8_linear.register_fake
def _(x: Tensor, w_q: Tensor, w_absmax: Tensor, bias: Tensor | None = None, threshold: float = 6.0) -> Tensor:
    check_llm_int8_inputs(x, w_q, w_absmax, bias, threshold)
    return linear_output(x, w_q)


register_inference_only_autograd(llm_int8_linear, "fxquant::llm_int8_linear")
