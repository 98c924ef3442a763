"""FP8 rowwise (W8A8) ops: e4m3 weights per output channel, e4m3 activations per token.

Numerics are FBGEMM's (`torch.ops.fbgemm.quantize_fp8_per_row`), so results compare bit for bit:
    scale = max(min(amax, scale_ub) / 448, 1 / (448 * 512))     per row, float32
    x_q   = saturate_e4m3(x / scale)
The CPU implementation is the reference: exact fp8 products accumulated in float32. On CUDA the
GEMM is FBGEMM's `f8f8bf16_rowwise` up to the GPU's `fbgemm_max_rows` (128 on the H100) when
fbgemm-gpu-genai imports, else
`torch._scaled_mm`; the GEMM alone is an op too (fp8_rowwise_mm), which the Inductor lowering gives
a choice of kernels. Each extern kernel of that choice is an op as well (scaled_mm_rowwise,
fbgemm_rowwise_mm, fp8_rowwise_mm_splitk; by_rows is fp8_rowwise_mm's CUDA kernel): a compiled
graph's Python wrapper calls the function, AOTInductor's C++ wrapper the op.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fxquant.inductor.tuning import device_tuning
from fxquant.ops.availability import fbgemm_genai_available, fp8_unsupported_reason
from fxquant.ops.fp8_common import FP8_DTYPE, device_scalar, fp8_scale, saturate_to_fp8
from fxquant.ops.linear_common import (
    check_linear_inputs,
    bf16_gemm_epilogue,
    dequantized_epilogue,
    gemm_output,
    linear_output,
    register_inference_only_autograd,
)


def quantize_fp8_rowwise(x: Tensor, scale_ub: float | None = None) -> tuple[Tensor, Tensor]:
    """Quantize each row (last dim) of `x` to e4m3: returns (x_q like x, float32 scale of x.shape[:-1])."""
    scale = fp8_scale(x.float().abs().amax(dim=-1), scale_ub)
    return saturate_to_fp8(x, scale.unsqueeze(-1)), scale


@torch.library.custom_op("fxquant::quantize_fp8_per_row", mutates_args=())
def quantize_fp8_per_row(x: Tensor, scale_ub: float | None = None) -> tuple[Tensor, Tensor]:
    """Dynamic per-token e4m3 quantization (reference implementation, any device)."""
    return quantize_fp8_rowwise(x, scale_ub)


def _quantize_fp8_rowwise_cuda(x: Tensor, scale_ub: float | None = None) -> tuple[Tensor, Tensor]:
    """FBGEMM's kernel where it applies (it reads its input as bf16), else the reference."""
    if x.dtype == torch.bfloat16 and x.shape[-1] % 2 == 0 and fbgemm_genai_available():
        ub = None if scale_ub is None else device_scalar(scale_ub, x.device).view(1)
        x_q, scale = torch.ops.fbgemm.quantize_fp8_per_row(x.contiguous(), None, ub)
        return x_q, scale.view(x.shape[:-1])
    return quantize_fp8_rowwise(x, scale_ub)


quantize_fp8_per_row.register_kernel("cuda")(_quantize_fp8_rowwise_cuda)


@quantize_fp8_per_row.register_fake
def _(x: Tensor, scale_ub: float | None = None) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fxquant::fp8_rowwise_mm", mutates_args=())
def fp8_rowwise_mm(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """bf16 [M, N] = (x_q [M, K] @ w_q [N, K].T) * x_scale [M, 1] * w_scale [1, N], all e4m3/float32.

    The GEMM alone, on operands already quantized: what the Inductor lowering of
    fp8_rowwise_linear leaves after the quantization is fused away (fxquant/inductor/fp8_rowwise_mm.py
    gives it a choice of kernels). CPU: the reference.
    """
    acc = x_q.float() @ w_q.float().t()
    return (acc * x_scale.unsqueeze(1) * w_scale.unsqueeze(0)).to(torch.bfloat16)


def scaled_mm_rowwise(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """fp8_rowwise_mm by `torch._scaled_mm` (cuBLASLt on CUDA)."""
    return torch._scaled_mm(
        x_q, w_q.t(), scale_a=x_scale.unsqueeze(1), scale_b=w_scale.unsqueeze(0),
        out_dtype=torch.bfloat16, use_fast_accum=True,
    )


@functools.cache
def fbgemm_rowwise_gemm() -> torch._ops.OpOverload:
    """FBGEMM's `f8f8bf16_rowwise`, its library loaded first: a graph Inductor takes from its cache
    calls the GEMM without the lowering (which loads fbgemm-gpu-genai) having run in this process."""
    if not fbgemm_genai_available():
        raise RuntimeError("fxquant: this compiled graph calls FBGEMM's f8f8bf16_rowwise, but "
                           "fbgemm-gpu-genai does not load in this process (the log says why)")
    return torch.ops.fbgemm.f8f8bf16_rowwise.default


def fbgemm_rowwise_mm(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """fp8_rowwise_mm by FBGEMM's `f8f8bf16_rowwise` (CUTLASS; needs fbgemm-gpu-genai)."""
    return fbgemm_rowwise_gemm()(x_q.contiguous(), w_q, x_scale, w_scale, use_fast_accum=True)


def rowwise_mm_by_rows(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """fp8_rowwise_mm by the faster library for this M, chosen at run time: FBGEMM up to the GPU's
    `fbgemm_max_rows` (fxquant/inductor/tuning.py; where fbgemm-gpu-genai imports), `torch._scaled_mm`
    above. The op's CUDA kernel, and the lowering's choice when M is known only at run time (a
    dynamic batch)."""
    rows = x_q.shape[0]
    if rows == 0:  # no tokens: neither library is asked to handle it
        return x_q.new_empty((0, w_q.shape[0]), dtype=torch.bfloat16)
    small = rows <= device_tuning(x_q.device).fbgemm_max_rows and fbgemm_genai_available()
    return (fbgemm_rowwise_mm if small else scaled_mm_rowwise)(x_q, w_q, x_scale, w_scale)


fp8_rowwise_mm.register_kernel("cuda")(rowwise_mm_by_rows)


@fp8_rowwise_mm.register_fake
def _(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    return gemm_output("fxquant::fp8_rowwise_mm", x_q, w_q)


def fp8_rowwise_mm_splitk(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """fp8_rowwise_mm by fxquant/kernels/fp8_rowwise_splitk.py's kernel, imported on first use (triton: GPU
    machines only)."""
    from fxquant.kernels.fp8_rowwise_splitk import fp8_rowwise_mm_splitk as splitk

    return splitk(x_q, w_q, x_scale, w_scale)


def _register_extern_gemm_op(function) -> None:
    """`function` (x_q, w_q, x_scale, w_scale) → bf16 [M, N] as the op fxquant::<its name>, with a fake impl:
    what AOTInductor's C++ wrapper calls for the lowering's extern choice of that function."""
    name = f"fxquant::{function.__name__}"
    torch.library.custom_op(name, function, mutates_args=()).register_fake(
        lambda x_q, w_q, x_scale, w_scale: gemm_output(name, x_q, w_q)
    )


_register_extern_gemm_op(scaled_mm_rowwise)
_register_extern_gemm_op(fbgemm_rowwise_mm)
_register_extern_gemm_op(fp8_rowwise_mm_splitk)


@torch.library.custom_op("fxquant::fp8_rowwise_linear", mutates_args=())
def fp8_rowwise_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None
) -> Tensor:
    """y = quantize_fp8_per_row(x) @ w_q.T, rescaled per token and channel, + bias (CPU reference)."""
    check_linear_inputs("fxquant::fp8_rowwise_linear", x, w_q, w_scale, (w_q.shape[0],), bias)
    x_q, x_scale = quantize_fp8_rowwise(x.reshape(-1, x.shape[-1]), scale_ub)
    acc = x_q.float() @ w_q.float().t()  # products of e4m3 values are exact in float32
    return dequantized_epilogue(acc, x_scale, w_scale, bias, x)


@fp8_rowwise_linear.register_kernel("cuda")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None) -> Tensor:
    check_linear_inputs("fxquant::fp8_rowwise_linear", x, w_q, w_scale, (w_q.shape[0],), bias)
    reason = fp8_unsupported_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"fxquant::fp8_rowwise_linear: {reason}; use scheme='int8'")
    x_q, x_scale = _quantize_fp8_rowwise_cuda(x.reshape(-1, x.shape[-1]), scale_ub)  # no second dispatch
    y = rowwise_mm_by_rows(x_q, w_q, x_scale, w_scale)
    return bf16_gemm_epilogue(y, bias, x)


@fp8_rowwise_linear.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None) -> Tensor:
    check_linear_inputs("fxquant::fp8_rowwise_linear", x, w_q, w_scale, (w_q.shape[0],), bias)
    return linear_output(x, w_q)


register_inference_only_autograd(fp8_rowwise_linear, "fxquant::fp8_rowwise_linear")
