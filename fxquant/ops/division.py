"""fxquant::div_rn: a / b in float32, correctly rounded (IEEE round to nearest) on every backend.

A quantization code is the rounded quotient x / scale, so the quotient must be the correctly rounded
one for the codes to match eager torch and FBGEMM's quantizer to the bit. Eager division is (on the
CPU and in CUDA kernels); Triton's float32 `/` is not (div.full.f32, within 2 ulp). Inductor lowers
this op to its `div_rn` (fxquant/inductor/division.py) and leaves every other division of a graph
as plain torch.compile writes it: the model around the quantization (SiLU's x / (1 + exp(-x)),
softmax) compiles as in the float model.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("fxquant::div_rn", mutates_args=())
def div_rn(a: Tensor, b: Tensor) -> Tensor:
    """a / b (float32, broadcast), correctly rounded."""
    torch._check(a.dtype == torch.float32 and b.dtype == torch.float32,
                 lambda: f"fxquant::div_rn divides float32 tensors, got {a.dtype} / {b.dtype}")
    return torch.div(a, b)


@div_rn.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.float32, device=a.device)
