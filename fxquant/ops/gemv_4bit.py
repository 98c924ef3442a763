"""fxquant::gemv_4bit_partials: one activation row times a 4-bit weight, as float32 sums over slices of
K (the split-K GEMV of fxquant/kernels/gemm_4bit.py) that the caller adds up.

    partials[s, n] = sum over k in slice s of x[0, k] * W[n, k]      W: the float32 dequantized weight
    linear_4bit(x) = (sum over s of partials[s]) in the compute dtype (+ bias)   (`linear_from_partials`)

linear_4bit's CUDA kernel adds them up itself; Inductor's decomposition of linear_4bit
(fxquant/inductor/decompositions_4bit.py) leaves the sum, the cast and the bias to Inductor, which
fuses them into the kernel that consumes the output instead of running two kernels after each GEMV
(on the H200, 8 Llama layers at batch 1: 56 reductions and 56 casts, 254 of 1426 µs of GPU time).
On the CPU the op is a reference: the same slices of the float32 product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.blockwise_4bit import _dynamic_map, _tables, check_4bit_inputs, dequantize_4bit


def splits_of(x: Tensor, w_q: Tensor, blocksize: int) -> int:
    from fxquant.kernels.gemm_4bit import splits_for

    return splits_for(w_q.shape[0], 2 * w_q.shape[1], blocksize, x.device)


def _check(x: Tensor, w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor, quant_type: str, blocksize: int) -> None:
    torch._check(x.dim() == 2 and x.shape[0] == 1, lambda: f"fxquant::gemv_4bit_partials: x must be one row [1, K], got {list(x.shape)}")
    check_4bit_inputs(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, None, None)


@torch.library.custom_op("fxquant::gemv_4bit_partials", mutates_args=())
def gemv_4bit_partials(x: Tensor, w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor,
                       quant_type: str, blocksize: int) -> Tensor:
    """x [1, K] @ the 4-bit weight [N, K].T as float32 partial sums [splits, N] over equal slices of K."""
    _check(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize)
    weight = dequantize_4bit(w_q, absmax_q, nested_absmax, offset.reshape(()), quant_type, blocksize)
    splits = splits_of(x, w_q, blocksize)
    slices = x.float().reshape(splits, 1, -1) @ weight.reshape(weight.shape[0], splits, -1).permute(1, 2, 0)
    return slices.reshape(splits, weight.shape[0])


@gemv_4bit_partials.register_fake
def _(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize):
    _check(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize)
    return x.new_empty((splits_of(x, w_q, blocksize), w_q.shape[0]), dtype=torch.float32)


@gemv_4bit_partials.register_kernel("cuda")
def _(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize):
    _check(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize)
    from fxquant.kernels.gemm_4bit import gemv_4bit_partials as kernel

    tables = (_tables(quant_type, w_q.device)[0], _dynamic_map(w_q.device))
    return kernel(x, w_q, absmax_q, nested_absmax, offset.reshape(1), *tables, blocksize)


def linear_from_partials(partials: Tensor, dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    """The GEMV's [1, N] output: the slices added in a fixed order in float32, cast to the compute dtype, + bias."""
    y = partials.sum(dim=0, keepdim=True).to(dtype)
    return y if bias is None else y + bias.to(dtype)
