"""int8 W8A8 ops: symmetric int8 weights per output channel, int8 activations per token.

    scale = max(amax, 1e-8) / 127      per row, float32
    x_q   = clamp(round(x / scale), -127, 127)
The GEMM accumulates in int32 (`torch._int_mm`, CPU and CUDA; float32 matmuls over short slices of K,
exact, on a CPU without int8 dot products) and the epilogue rescales by the token and channel scales.
cuBLAS's int8 GEMM needs more than 16 rows; smaller batches are padded.
`int8_rowwise_mm` is the GEMM with its scales, on quantized operands: what the int8 lowering calls
(fxquant/inductor/int8_decompositions.py), with kernels to choose from (cuBLAS, fxquant's split-K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxquant.inductor.tuning import device_tuning
from fxquant.ops.availability import cpu_int8_slow_reason
from fxquant.ops.division import div_rn
from fxquant.ops.linear_common import (
    check_linear_inputs,
    dequantized_epilogue,
    linear_output,
    register_inference_only_autograd,
)

INT8_MAX = 127
INT8_MIN_AMAX = 1e-8  # an all-zero row quantizes to zeros with a finite scale
CUDA_INT_MM_MIN_ROWS = 17
SPLITK_MAX_ROWS = 16  # fxquant/kernels/int8_rowwise_splitk.py's one BLOCK_M tile


def quantize_int8_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize each row (last dim) of `x` to int8: returns (x_q like x, float32 scale of x.shape[:-1])."""
    x = x.float()
    # Correctly rounded division, so CPU and CUDA agree to the bit (see quantize_fp8_rowwise).
    scale = (x.abs().amax(dim=-1).clamp(min=INT8_MIN_AMAX).double() / INT8_MAX).float()
    x_q = torch.round(div_rn(x, scale.unsqueeze(-1))).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return x_q, scale


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 [M, K] @ int8 [K, N] → int32, padding M where cuBLAS wants more rows; on a CPU without int8
    dot products by float32 matmuls (`int_mm_by_float_matmuls`), where aten's is a reference loop."""
    rows = a.shape[0]
    if rows == 0:
        return a.new_zeros((0, b.shape[1]), dtype=torch.int32)
    if a.is_cuda and rows < CUDA_INT_MM_MIN_ROWS:
        return torch._int_mm(F.pad(a, (0, 0, 0, 32 - rows)), b)[:rows]
    if a.device.type == "cpu" and cpu_int8_slow_reason() is not None:
        return int_mm_by_float_matmuls(a, b)
    return torch._int_mm(a, b)


# float32 sums of int8 products are exact below 2^24: up to 1040 products of at most 127 * 127.
EXACT_FLOAT32_K = 1024


def int_mm_by_float_matmuls(a: Tensor, b: Tensor) -> Tensor:
    """int8 [M, K] @ int8 [K, N] → int32, exactly (aten._int_mm's bits), as float32 matmuls over slices
    of K short enough that their sums are exact, added in int32: on a CPU without VNNI or AMX the
    float32 GEMM is 20-40x faster than aten's int8 loop (benchmarks/RESULTS.md, fifteenth session)."""
    total = a.new_zeros((a.shape[0], b.shape[1]), dtype=torch.int32)  # K = 0: zeros, as aten's
    for start in range(0, a.shape[1], EXACT_FLOAT32_K):  # out of place: Inductor traces it (int8's decomposition)
        total = total + (a[:, start:start + EXACT_FLOAT32_K].float() @ b[start:start + EXACT_FLOAT32_K].float()).to(torch.int32)
    return total


def scaled_int_mm(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """out_dtype [M, N] = float(x_q [M, K] @ w_q [N, K].T) * x_scale [M, 1] * w_scale [1, N]: `torch._int_mm`
    (cuBLAS on CUDA, oneDNN on the CPU), then the scales in float32, rounded once to `out_dtype`. The
    int32 sums are exact, so every kernel that applies the scales in this order gives these bits."""
    return (int_mm(x_q, w_q.t()).float() * x_scale.unsqueeze(1) * w_scale.unsqueeze(0)).to(out_dtype)


def int8_rowwise_mm_by_rows(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """int8_rowwise_mm by the kernel for this M, chosen at run time: on CUDA fxquant's split-K kernel up
    to 16 rows (where cuBLAS's would pad to 32), above that fxquant's tiled kernel below the GPU's
    `int8_cublas_min_rows` (fxquant/inductor/tuning.py) and cuBLAS's `_int_mm` from it; elsewhere
    `_int_mm`. The op's CUDA kernel, and the lowering's choice where M is known only at run time (a
    dynamic batch)."""
    if x_q.is_cuda and x_q.shape[0] <= SPLITK_MAX_ROWS:
        return int8_rowwise_mm_splitk(x_q, w_q, x_scale, w_scale, out_dtype)
    if x_q.is_cuda and x_q.shape[0] < device_tuning(x_q.device).int8_cublas_min_rows:
        from fxquant.kernels.int8_rowwise_splitk import int8_rowwise_mm_tiled

        return int8_rowwise_mm_tiled(x_q, w_q, x_scale, w_scale, out_dtype)
    return scaled_int_mm(x_q, w_q, x_scale, w_scale, out_dtype)


def int8_rowwise_mm_splitk(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """int8_rowwise_mm by fxquant/kernels/int8_rowwise_splitk.py's kernel (M <= 16), imported on first use
    (triton: GPU machines, or its interpreter)."""
    from fxquant.kernels.int8_rowwise_splitk import int8_rowwise_mm_splitk as splitk

    return splitk(x_q, w_q, x_scale, w_scale, out_dtype)


@torch.library.custom_op("fxquant::int8_rowwise_mm", mutates_args=())
def int8_rowwise_mm(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """out_dtype [M, N] = float(x_q [M, K] @ w_q [N, K].T) * x_scale [M, 1] * w_scale [1, N], int8 operands,
    the scales applied in float32 and the result rounded once to `out_dtype`.

    The GEMM alone, on operands already quantized: what the CUDA lowering of int8_linear leaves after
    the quantization is fused away (fxquant/inductor/int8_rowwise_mm.py gives it a choice of kernels).
    A layer without bias asks for its activation's dtype, so that a kernel Inductor cannot fuse a
    cast into (an extern one) writes the output once, in two bytes an element rather than four.
    """
    return scaled_int_mm(x_q, w_q, x_scale, w_scale, out_dtype)


int8_rowwise_mm.register_kernel("cuda")(int8_rowwise_mm_by_rows)


def _scaled_gemm_output(name: str, x_q: Tensor, w_q: Tensor, out_dtype: torch.dtype) -> Tensor:
    torch._check(x_q.dim() == 2 and x_q.shape[1] == w_q.shape[1], lambda: f"{name}: x_q must be [M, K={w_q.shape[1]}]")
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


int8_rowwise_mm.register_fake(
    lambda x_q, w_q, x_scale, w_scale, out_dtype=torch.float32: _scaled_gemm_output("fxquant::int8_rowwise_mm", x_q, w_q, out_dtype))

# The lowering's extern choices as ops too: what AOTInductor's C++ wrapper calls.
for _function in (scaled_int_mm, int8_rowwise_mm_by_rows, int8_rowwise_mm_splitk):
    torch.library.custom_op(f"fxquant::{_function.__name__}", _function, mutates_args=()).register_fake(
        lambda x_q, w_q, x_scale, w_scale, out_dtype=torch.float32, name=f"fxquant::{_function.__name__}":
        _scaled_gemm_output(name, x_q, w_q, out_dtype)
    )


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
