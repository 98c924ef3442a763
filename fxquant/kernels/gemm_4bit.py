"""Fused 4-bit dequantize + GEMM for decode (M <= 16): bitsandbytes' NF4 / FP4 weights read as packed
bytes and dequantized in registers, never written out.

    out[M, N] = x[M, K] @ W[N, K].T,   W[n, k] = CODE[nibble(n, k)] * absmax(n, k // blocksize)
    absmax    = DYNAMIC_MAP[absmax_q] * nested_absmax[block // 256] + offset      (double quantization)

At decode the GEMM streams the weight once and does almost no math, so what counts is bytes (a
quarter of bf16's) and loads in flight: each program takes a BLOCK_N slice of outputs and a K_PER_SPLIT
slice of K (split-K), so that N = 4096 gives enough programs for an H100/H200's 132 SMs. A tile's
bytes become codes in registers (tl.join of the high and low nibbles), are looked up in the 16-value
table and scaled by one absmax per blocksize-long block of the tile; the dequantized tile is rounded
to the compute dtype (x's) as the reference does (float32 products, then the cast), multiplied on tensor cores with float32 accumulation; split partials go to a float32
workspace [SPLIT_K, M, N] summed in a fixed order (deterministic). Larger M dequantizes once and
runs cuBLAS (fxquant/ops/blockwise_4bit.py chooses by M).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fxquant.ops.blockwise_4bit import NESTED_BLOCKSIZE

MAX_ROWS = 16  # one BLOCK_M tile: the kernel is for decode-sized M only
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 128
MIN_K_PER_SPLIT = 4 * BLOCK_K  # shorter slices spend more on the prologue than they stream
PROGRAMS_PER_SM = 4


def fits(rows: int) -> bool:
    """Whether `rows` activation rows run this kernel (else: dequantize, then cuBLAS)."""
    return 0 < rows <= MAX_ROWS


@triton.jit
def _gemm_4bit_kernel(
    x_ptr, w_ptr, absmax_q_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_map_ptr, out_ptr,
    M, N, K, stride_xm,
    K_PER_SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr, GROUPS: tl.constexpr, NESTED: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_K // 2)  # the tile's bytes along K
    rg = tl.arange(0, GROUPS)  # the tile's absmax blocks (GROUPS = BLOCK_K / BLOCKSIZE, or 1)
    mask_m = rm < M
    mask_n = rn < N
    offset = tl.load(offset_ptr)
    blocks_per_row = K // BLOCKSIZE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + step
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :], other=0.0)
        # W tile [BLOCK_N, BLOCK_K] from [BLOCK_N, BLOCK_K / 2] bytes, the even k in the high nibble
        byte_k = k0 // 2 + rj
        byte = tl.load(w_ptr + rn[:, None] * (K // 2) + byte_k[None, :],
                       mask=mask_n[:, None] & (byte_k < K // 2)[None, :], other=0).to(tl.int32)
        values = tl.load(code_ptr + tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK_N, BLOCK_K)))
        group_k = k0 + rg * (BLOCK_K // GROUPS)
        block = rn[:, None] * blocks_per_row + (group_k // BLOCKSIZE)[None, :]
        mask_g = mask_n[:, None] & (group_k < K)[None, :]
        absmax_q = tl.load(absmax_q_ptr + block, mask=mask_g, other=0).to(tl.int32)
        absmax = tl.load(dynamic_map_ptr + absmax_q) * tl.load(nested_ptr + block // NESTED, mask=mask_g, other=0.0) + offset
        scaled = tl.reshape(values, (BLOCK_N, GROUPS, BLOCK_K // GROUPS)) * absmax[:, :, None]
        w = tl.reshape(scaled, (BLOCK_N, BLOCK_K)).to(x.dtype)  # float32 products, then the compute dtype
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)

    out_ptrs = out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs to fill (an H100's 132 where the interpreter runs on CPU tensors)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def split_k_for(n: int, k: int, sms: int) -> int:
    """How many slices K is cut into: about PROGRAMS_PER_SM programs per SM, each slice at least
    MIN_K_PER_SPLIT long."""
    tiles = triton.cdiv(n, BLOCK_N)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, tiles)
    return max(1, min(wanted, k // MIN_K_PER_SPLIT))


def gemm_4bit(x: torch.Tensor, w_q: torch.Tensor, absmax_q: torch.Tensor, nested_absmax: torch.Tensor,
              offset: torch.Tensor, code: torch.Tensor, dynamic_map: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x [M <= 16, K] (bf16, fp16 or fp32: the compute dtype) @ the 4-bit weight [N, K] → [M, N] in x's dtype."""
    m, k = x.shape
    n = w_q.shape[0]
    assert fits(m) and w_q.shape[1] * 2 == k and k % blocksize == 0, (x.shape, w_q.shape, blocksize)
    x = x.contiguous()
    splits = split_k_for(n, k, _sm_count(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(k, k_per_split)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    _gemm_4bit_kernel[(triton.cdiv(n, BLOCK_N), splits)](
        x, w_q, absmax_q, nested_absmax, offset, code, dynamic_map, partial, m, n, k, x.stride(0),
        K_PER_SPLIT=k_per_split, BLOCKSIZE=blocksize, GROUPS=max(1, BLOCK_K // blocksize), NESTED=NESTED_BLOCKSIZE, IEEE=x.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return (partial[0] if splits == 1 else partial.sum(dim=0)).to(x.dtype)
