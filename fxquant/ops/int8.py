"""int8 W8A8 ops: symmetric int8 weights per output channel, int8 activations per token.

    scale = max(amax, 1e-8) / 127      per row, float32
    x_q   = clamp(round(x / scale), -127, 127)
The GEMM accumulates in int32 (`torch._int_mm`, CPU and CUDA) and the epilogue rescales by the
token and channel scales. cuBLAS's int8 GEMM needs more than 16 rows; smaller batches are padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxquant.ops.linear_common import (
    check_linear_inputs,
    dequantized_epilogue,
    linear_output,
    register_inference_only_autograd,
)

INT8_MAX = 127
INT8_MIN_AMAX = 1e-8  # an all-zero row quantizes to zeros with a finite scale
CUDA_INT_MM_MIN_ROWS = 17


def quantize_int8_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize each row (last dim) of `x` to int8: returns (x_q like x, float32 scale of x.shape[:-1])."""
    x = x.float()
    # Correctly rounded division, so CPU and CUDA agree to the bit (see quantize_fp8_rowwise).
    scale = (x.abs().amax(dim=-1).clamp(min=INT8_MIN_AMAX).double() / INT8_MAX).float()
    x_q = torch.round(x / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x_q, scale


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 [M, K] @ int8 [K, N] → int32, padding M where cuBLAS wants more rows."""
    rows = a.shape[0]
    if rows == 0:
        return a.new_zeros((0, b.shape[1]), dtype=torch.int32)
    if a.is_cuda and rows < CUDA_INT_MM_MIN_ROWS:
        return torch._int_mm(F.pad(a, (0, 0, 0, 32 - rows)), b)[:rows]
    return torch._int_mm(a, b)


@torch.library.custom_op("fxquant::quantize_int8_per_row", mutates_args=())
def quantize_int8_per_row(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token symmetric int8 quantization."""
    return quantize_int8_rowwise(x)


@quantize_int8_per_row.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fxquant::int8_linear", mutates_args=())
def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = quantize_int8_per_row(x) @ w_q.T in int32, rescaled per token and channel, + bias."""
    check_linear_inputs("fxquant::int8_linear", x, w_q, w_scale, (w_q.shape[0],), bias)
    x_q, x_scale = quantize_int8_rowwise(x.reshape(-1, x.shape[-1]))
    return dequantized_epilogue(int_mm(x_q, w_q.t()), x_scale, w_scale, bias, x)


@int8_linear.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    check_linear_inputs("fxquant::int8_linear", x, w_q, w_scale, (w_q.shape[0],), bias)
    return linear_output(x, w_q)


register_inference_only_autograd(int8_linear, "fxquant::int8_linear")
