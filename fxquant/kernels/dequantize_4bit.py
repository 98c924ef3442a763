"""4-bit weights dequantized in one pass for the large-M path (then cuBLAS): bitsandbytes' NF4 / FP4
bytes [N, K / 2] with double-quantized absmax → W [N, K] in the compute dtype.

    W[n, k] = CODE[nibble(n, k)] * (DYNAMIC_MAP[absmax_q[n, k // blocksize]] * nested_absmax[b // 256] + offset)

float32 products, then the cast, as fxquant/ops/blockwise_4bit.py's reference. The torch version of
the same formula runs eight kernels and holds int64 codes (8 bytes a weight); this reads the bytes
once and writes the weight once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxquant.ops.blockwise_4bit import NESTED_BLOCKSIZE

BLOCK_N, BLOCK_K = 32, 256


@triton.jit
def _dequantize_4bit_kernel(
    w_ptr, absmax_q_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_map_ptr, out_ptr, N, K,
    BLOCKSIZE: tl.constexpr, GROUPS: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    byte_k = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_n = rn < N
    byte = tl.load(w_ptr + rn[:, None] * (K // 2) + byte_k[None, :],
                   mask=mask_n[:, None] & (byte_k < K // 2)[None, :], other=0).to(tl.int32)
    values = tl.load(code_ptr + tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK_N, BLOCK_K)))
    group_k = k0 + tl.arange(0, GROUPS) * (BLOCK_K // GROUPS)
    block = rn[:, None] * (K // BLOCKSIZE) + (group_k // BLOCKSIZE)[None, :]
    mask_g = mask_n[:, None] & (group_k < K)[None, :]
    absmax_q = tl.load(absmax_q_ptr + block, mask=mask_g, other=0).to(tl.int32)
    absmax = tl.load(dynamic_map_ptr + absmax_q) * tl.load(nested_ptr + block // NESTED, mask=mask_g, other=0.0) + tl.load(offset_ptr)
    w = tl.reshape(tl.reshape(values, (BLOCK_N, GROUPS, BLOCK_K // GROUPS)) * absmax[:, :, None], (BLOCK_N, BLOCK_K))
    rk = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (rk < K)[None, :])


def dequantize_4bit(w_q: torch.Tensor, absmax_q: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor,
                    code: torch.Tensor, dynamic_map: torch.Tensor, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in `dtype` of packed codes [N, K / 2] and double-quantized absmax."""
    n, k = w_q.shape[0], w_q.shape[1] * 2
    out = torch.empty((n, k), dtype=dtype, device=w_q.device)
    _dequantize_4bit_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))](
        w_q, absmax_q, nested_absmax, offset, code, dynamic_map, out, n, k,
        BLOCKSIZE=blocksize, GROUPS=max(1, BLOCK_K // blocksize), NESTED=NESTED_BLOCKSIZE, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out
