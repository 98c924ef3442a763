"""Open fxquant::linear_4bit (nf4, fp4) up to Inductor on CUDA, for up to 16 activation rows (decode).

    linear_4bit(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, compute_dtype, bias)
      → fxquant::linear_4bit_partials(x in the compute dtype, ...)  the split-K GEMV or GEMM: float32
                                                                    sums over slices of K (an extern call)
      → their sum, the cast, the bias, x's dtype                   reduction + pointwise, fused into
                                                                   the kernel that consumes the output
More rows, or a row count known only at run time, keep the op whole (dequantize, then cuBLAS).
The arithmetic is the op's own (fxquant/ops/linear_4bit_partials.py: `linear_from_partials`), so the results agree.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.blockwise_4bit import compute_dtype_of
from fxquant.ops.linear_4bit_partials import linear_from_partials


def linear_4bit(x: Tensor, w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor, quant_type: str,
                blocksize: int, compute_dtype: str | None = None, bias: Tensor | None = None) -> Tensor:
    """fxquant::linear_4bit of up to 16 rows as the kernels' partial sums and aten ops Inductor fuses;
    NotImplemented (the op stays whole) for other row counts."""
    from fxquant.kernels.gemm_4bit import fits  # triton: imported where the decomposition runs (CUDA)

    rows = x.numel() // x.shape[-1]
    if not isinstance(rows, int) or not fits(rows):  # a row count known only at run time, or too many
        return NotImplemented
    dtype = compute_dtype_of(x, compute_dtype)
    partials = torch.ops.fxquant.linear_4bit_partials(x.reshape(rows, -1).to(dtype), w_q, absmax_q, nested_absmax, offset,
                                                      quant_type, blocksize)
    return linear_from_partials(partials, dtype, bias).to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
