"""Fused 4-bit dequantize + GEMV for one activation row (decode at batch 1): bitsandbytes' NF4 / FP4
weights read as packed bytes and dequantized in registers, never written out.

    out[1, N] = x[1, K] @ W[N, K].T,   W[n, k] = CODE[nibble(n, k)] * absmax(n, k // blocksize)
    absmax    = DYNAMIC_MAP[absmax_q] * nested_absmax[block // 256] + offset      (double quantization)

At decode the product streams the weight once and does almost no math, so what counts is bytes (a
quarter of bf16's), loads in flight and the instructions spent per weight. Each program takes a
BLOCK_N slice of outputs and a K_PER_SPLIT slice of K (split-K, PROGRAMS_PER_SM programs per SM) and
walks it BLOCK_K elements at a time, BLOCK_K within one absmax block, so a step needs one absmax per
row. The slices split K's steps evenly, so no load along K is masked (a mask there costs the byte
loads their vector width: 0.38-0.42x of bf16 against 0.6-0.75x without, measured). A byte's high nibble is the even element and its low nibble the odd one: they multiply x's even
and odd elements, so the codes are never interleaved back. The weight is rounded to the compute dtype
(x's) as the reference does (float32 product, then the cast), multiplied with x on the CUDA cores in
float32 and summed into a [BLOCK_N, BLOCK_K / 2] accumulator, reduced once at the end. Split partials
go to a float32 workspace [SPLIT_K, 1, N] summed in a fixed order (deterministic).

Measured on the H200 (benchmarks/RESULTS.md, twelfth session): tensor-core variants of this kernel
(`tl.dot` on the tile dequantized in registers, either operand order) ran at 0.07-0.13x of bf16's
cuBLAS at M = 1 and 16, this one at 0.6-0.75x at M = 1. More rows dequantize once and run cuBLAS
(fxquant/ops/blockwise_4bit.py chooses by M).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fxquant.ops.blockwise_4bit import NESTED_BLOCKSIZE

BLOCK_N = 128
MAX_BLOCK_K = 128  # elements a step reads per row (64 bytes), and at most one absmax block
MIN_K_PER_SPLIT = 256  # shorter slices spend more on the prologue than they stream
PROGRAMS_PER_SM = 16  # more programs in flight hid the loads better on every shape measured


def fits(rows: int) -> bool:
    """Whether `rows` activation rows run this kernel (else: dequantize, then cuBLAS)."""
    return rows == 1


@triton.jit
def _gemv_4bit_kernel(
    x_ptr, w_ptr, absmax_q_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_map_ptr, out_ptr, N, K,
    K_PER_SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_K // 2)  # the step's bytes along K
    mask_n = rn < N
    offset = tl.load(offset_ptr)
    compute = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    for step in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + step
        byte = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rj)[None, :], mask=mask_n[:, None], other=0)
        block = rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE
        absmax_q = tl.load(absmax_q_ptr + block, mask=mask_n, other=0).to(tl.int32)
        absmax = tl.load(dynamic_map_ptr + absmax_q) * tl.load(nested_ptr + block // NESTED, mask=mask_n, other=0.0) + offset
        even = tl.load(code_ptr + (byte >> 4)) * absmax[:, None]  # float32 products, then the compute dtype
        odd = tl.load(code_ptr + (byte & 0xF)) * absmax[:, None]
        x_even = tl.load(x_ptr + k0 + 2 * rj).to(tl.float32)
        x_odd = tl.load(x_ptr + k0 + 2 * rj + 1).to(tl.float32)
        acc += even.to(compute).to(tl.float32) * x_even[None, :] + odd.to(compute).to(tl.float32) * x_odd[None, :]

    tl.store(out_ptr + pid_k * N + rn, tl.sum(acc, axis=1), mask=mask_n)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs to fill (an H100's 132 where the interpreter runs on CPU tensors)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def block_k_for(blocksize: int) -> int:
    return min(blocksize, MAX_BLOCK_K)


def split_k_for(n: int, k: int, blocksize: int, sms: int) -> int:
    """How many slices K is cut into: at most about PROGRAMS_PER_SM programs per SM, each slice at least
    MIN_K_PER_SPLIT long, and the most such that divides K's steps evenly."""
    steps = k // block_k_for(blocksize)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, triton.cdiv(n, BLOCK_N))
    most = max(1, min(wanted, k // MIN_K_PER_SPLIT, steps))
    return next(splits for splits in range(most, 0, -1) if steps % splits == 0)


def gemm_4bit(x: torch.Tensor, w_q: torch.Tensor, absmax_q: torch.Tensor, nested_absmax: torch.Tensor,
              offset: torch.Tensor, code: torch.Tensor, dynamic_map: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x [1, K] (bf16, fp16 or fp32: the compute dtype) @ the 4-bit weight [N, K] → [1, N] in x's dtype."""
    m, k = x.shape
    n = w_q.shape[0]
    assert fits(m) and w_q.shape[1] * 2 == k and k % blocksize == 0, (x.shape, w_q.shape, blocksize)
    x = x.contiguous()
    block_k = block_k_for(blocksize)
    splits = split_k_for(n, k, blocksize, _sm_count(x.device))
    k_per_split = k // splits
    partial = torch.empty((splits, 1, n), dtype=torch.float32, device=x.device)
    _gemv_4bit_kernel[(triton.cdiv(n, BLOCK_N), splits)](
        x, w_q, absmax_q, nested_absmax, offset, code, dynamic_map, partial, n, k,
        K_PER_SPLIT=k_per_split, BLOCKSIZE=blocksize, NESTED=NESTED_BLOCKSIZE, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        num_warps=4, num_stages=3,
    )
    return (partial[0] if splits == 1 else partial.sum(dim=0)).to(x.dtype)
