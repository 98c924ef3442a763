"""Open fxquant::int8_linear up to Inductor, on the CPU and on CUDA.

    int8_linear(x, w_q, w_scale, bias)
      → amax = max(|x|) per row; scale = amax / 127; x_q = round(x / scale)    (reduction + pointwise)
      CPU:  → aten._int_mm(x_q, w_q.T)                                         (Inductor's int8 GEMM: oneDNN;
            without VNNI / AMX float32 matmuls over slices of K, exact: fxquant/ops/int8.py's int_mm)
            → acc * scale * w_scale (+ bias), cast to x's dtype                (pointwise epilogue)
      CUDA: → fxquant::int8_rowwise_mm(x_q, w_q, scale, w_scale, out_dtype) (+ bias), cast (fxquant's GEMM
            lowering, fxquant/inductor/int8_rowwise_mm.py: its Triton template, split-K, or cuBLAS; out_dtype
            is x's where there is no bias to add in float32)

Inductor fuses the quantization into the kernel that produces x (a LayerNorm, GELU, residual add)
and the rescale into one pointwise kernel after the GEMM (on CUDA into the template's epilogue).
On the CPU `_int_mm` is oneDNN's int8 GEMM (VNNI / AMX where the CPU has them), 4x the fp32 GEMM's
speed at MiniLM's and the demo's shapes on a 2-core AVX512-VNNI EPYC; the eager reference
(fxquant/ops/int8.py) spends most of its time quantizing, unfused. The quantization is the
reference's, so the codes are the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.inductor import int8_rowwise_mm  # noqa: F401  (registers the CUDA GEMM's lowering)
from fxquant.ops.int8 import int_mm, quantize_int8_rowwise
from fxquant.ops.linear_common import dequantized_epilogue

# Where the decomposition applies (fxquant/inductor/install.py reads it): the CPU too, unlike the FP8
# schemes', because Inductor's own int8 GEMM is the fast path there.
LOWERED_DEVICE_TYPES = frozenset({"cpu", "cuda"})


def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """fxquant::int8_linear as aten ops Inductor fuses around its int8 GEMM."""
    x_q, x_scale = quantize_int8_rowwise(x.reshape(-1, x.shape[-1]))
    if x.device.type == "cpu":
        return dequantized_epilogue(int_mm(x_q, w_q.t()), x_scale, w_scale, bias, x)
    # Without a bias the GEMM rounds to x's dtype itself (the reference's one rounding): an extern
    # kernel then writes two bytes an element where float32 took four, and its reader reads two.
    out_dtype = torch.float32 if bias is not None else x.dtype
    y = torch.ops.fxquant.int8_rowwise_mm(x_q, w_q, x_scale, w_scale, out_dtype)
    return dequantized_epilogue(y, None, None, bias, x)


int8_linear.lowered_device_types = LOWERED_DEVICE_TYPES
