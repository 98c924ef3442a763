"""fxquant::linear_4bit_partials: a few activation rows times a 4-bit weight, as float32 sums over
slices of K (the split-K kernels of fxquant/kernels/gemm_4bit.py) that the caller adds up.

    partials[s, m, n] = sum over k in slice s of x[m, k] * W[n, k]      W: the dequantized weight
    linear_4bit(x) = (sum over s of partials[s]) in the compute dtype (+ bias)   (`linear_from_partials`)

linear_4bit's CUDA kernel adds them up itself; Inductor's decomposition of linear_4bit
(fxquant/inductor/decompositions_4bit.py) leaves the sum, the cast and the bias to Inductor, which
fuses them into the kernel that consumes the output instead of running two kernels after each GEMM
(on the H200, 8 Llama layers at batch 1: 56 reductions and 56 casts, 254 of 1426 µs of GPU time).
On the CPU the op is a reference: the same slices of the float32 product. The CUDA kernel for more
than one row rounds the weight to the compute dtype first (the tensor cores' input), as
`linear_4bit_reference` does; the one-row GEMV never forms it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.blockwise_4bit import _dynamic_map, _tables, check_4bit_inputs, dequantize_4bit


def splits_of(x: Tensor, w_q: Tensor, blocksize: int) -> int:
    from fxquant.kernels.gemm_4bit import splits_for

    return splits_for(x.shape[0], w_q.shape[0], 2 * w_q.shape[1], blocksize, x.device)


def _check(x: Tensor, w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor, quant_type: str, blocksize: int) -> None:
    from fxquant.kernels.gemm_4bit import MAX_ROWS

    torch._check(x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS,
                 lambda: f"fxquant::linear_4bit_partials: x must be [M, K] with 1 ≤ M ≤ {MAX_ROWS}, got {list(x.shape)}")
    check_4bit_inputs(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, None, None)


@torch.library.custom_op("fxquant::linear_4bit_partials", mutates_args=())
def linear_4bit_partials(x: Tensor, w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor,
                         quant_type: str, blocksize: int) -> Tensor:
    """x [M, K] @ the 4-bit weight [N, K].T as float32 partial sums [splits, M, N] over equal slices of K."""
    _check(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize)
    weight = dequantize_4bit(w_q, absmax_q, nested_absmax, offset.reshape(()), quant_type, blocksize)
    splits = splits_of(x, w_q, blocksize)
    rows = x.shape[0]
    slices = x.float().reshape(rows, splits, -1).transpose(0, 1) @ weight.reshape(weight.shape[0], splits, -1).permute(1, 2, 0)
    return slices.contiguous()


@linear_4bit_partials.register_fake
def _(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize):
    _check(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize)
    return x.new_empty((splits_of(x, w_q, blocksize), x.shape[0], w_q.shape[0]), dtype=torch.float32)


@linear_4bit_partials.register_kernel("cuda")
def _(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize):
    _check(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize)
    from fxquant.kernels.gemm_4bit import gemm_4bit_partials

    tables = (_tables(quant_type, w_q.device)[0], _dynamic_map(w_q.device))
    return gemm_4bit_partials(x, w_q, absmax_q, nested_absmax, offset.reshape(1), *tables, blocksize)


def linear_from_partials(partials: Tensor, dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    """The [M, N] output: the slices added in a fixed order in float32, cast to the compute dtype, + bias."""
    y = partials.sum(dim=0).to(dtype)
    return y if bias is None else y + bias.to(dtype)
