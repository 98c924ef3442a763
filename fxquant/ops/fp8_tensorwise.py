"""FP8 tensorwise ops: one e4m3 scale for the whole weight, one for the whole activation.

Dynamic: the activation scale is computed per call from the tensor's amax. Static: the
activation scale comes from calibration (`fxquant.calibrate`), and the rewrite folds it and its
product with the weight scale into two float constants of the graph:
    y = (e4m3(x / x_scale) @ w_q.T) * output_scale + bias,   output_scale = x_scale * w_scale
On CUDA the GEMM is `torch._scaled_mm` with tensorwise scales; the CPU reference accumulates the
exact fp8 products in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.availability import fp8_unsupported_reason
from fxquant.ops.fp8_common import device_scalar, fp8_scale, saturate_to_fp8
from fxquant.ops.linear_common import (
    check_linear_inputs,
    dequantized_epilogue,
    linear_output,
    register_inference_only_autograd,
)

DYNAMIC_OP = "fxquant::fp8_tensorwise_linear"
STATIC_OP = "fxquant::fp8_tensorwise_static_linear"


def quantize_fp8_tensorwise(x: Tensor, scale_ub: float | None = None) -> tuple[Tensor, Tensor]:
    """Quantize all of `x` with one scale: (x_q like x, float32 0-dim scale)."""
    # amax over an empty tensor (no tokens) is 0 here, which takes the minimum scale.
    amax = x.float().abs().flatten().amax(dim=0) if x.numel() else x.new_zeros((), dtype=torch.float32)
    scale = fp8_scale(amax, scale_ub)
    return saturate_to_fp8(x, scale), scale


def tensorwise_gemm(x_q: Tensor, w_q: Tensor, output_scale: Tensor | float, out_dtype: torch.dtype) -> Tensor:
    """(x_q @ w_q.T) * output_scale: `torch._scaled_mm` on CUDA, exact float32 accumulation elsewhere."""
    if x_q.is_cuda:
        reason = fp8_unsupported_reason(x_q.device)
        if reason is not None:
            raise RuntimeError(f"fxquant: fp8_tensorwise: {reason}; use scheme='int8'")
        scale = output_scale if isinstance(output_scale, Tensor) else device_scalar(output_scale, x_q.device)
        one = device_scalar(1.0, x_q.device)
        return torch._scaled_mm(x_q, w_q.t(), scale_a=scale, scale_b=one, out_dtype=out_dtype, use_fast_accum=True)
    return (x_q.float() @ w_q.float().t()) * output_scale


@torch.library.custom_op(DYNAMIC_OP, mutates_args=())
def fp8_tensorwise_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None
) -> Tensor:
    """y = e4m3(x / x_scale) @ w_q.T * (x_scale * w_scale) + bias, x_scale from this call's amax."""
    check_linear_inputs(DYNAMIC_OP, x, w_q, w_scale, (), bias)
    x_q, x_scale = quantize_fp8_tensorwise(x.reshape(-1, x.shape[-1]), scale_ub)
    out_dtype = torch.bfloat16 if x.is_cuda else torch.float32
    return dequantized_epilogue(tensorwise_gemm(x_q, w_q, x_scale * w_scale, out_dtype), None, None, bias, x)


@fp8_tensorwise_linear.register_fake
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None, scale_ub: float | None = None) -> Tensor:
    check_linear_inputs(DYNAMIC_OP, x, w_q, w_scale, (), bias)
    return linear_output(x, w_q)


@torch.library.custom_op(STATIC_OP, mutates_args=())
def fp8_tensorwise_static_linear(x: Tensor, w_q: Tensor, output_scale: float, bias: Tensor | None, x_scale: float) -> Tensor:
    """y = e4m3(x / x_scale) @ w_q.T * output_scale + bias, both scales folded constants."""
    check_linear_inputs(STATIC_OP, x, w_q, None, (), bias)
    x_q = saturate_to_fp8(x.reshape(-1, x.shape[-1]), x_scale)
    out_dtype = torch.bfloat16 if x.is_cuda else torch.float32
    return dequantized_epilogue(tensorwise_gemm(x_q, w_q, output_scale, out_dtype), None, None, bias, x)


@fp8_tensorwise_static_linear.register_fake
def _(x: Tensor, w_q: Tensor, output_scale: float, bias: Tensor | None, x_scale: float) -> Tensor:
    check_linear_inputs(STATIC_OP, x, w_q, None, (), bias)
    return linear_output(x, w_q)


register_inference_only_autograd(fp8_tensorwise_linear, DYNAMIC_OP)
register_inference_only_autograd(fp8_tensorwise_static_linear, STATIC_OP)
