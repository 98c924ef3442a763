"""Fused 4-bit dequantize + GEMV for one activation row (decode at batch 1): bitsandbytes' NF4 / FP4
weights read as packed bytes and dequantized in registers, never written out.

    out[1, N] = x[1, K] @ W[N, K].T,   W[n, k] = CODE[nibble(n, k)] * absmax(n, k // blocksize)
    absmax    = DYNAMIC_MAP[absmax_q] * nested_absmax[block // 256] + offset      (double quantization)

At decode the product streams the weight once and does almost no math, so what counts is bytes (a
quarter of bf16's), loads in flight and the instructions spent per weight. Each program (one warp)
takes a BLOCK_N slice of outputs and a K_PER_SPLIT slice of K (split-K, PROGRAMS_PER_SM programs per
SM) and walks it BLOCK_K elements at a time, BLOCK_K within one absmax block, so a step needs one
absmax per row. The slices split K's steps evenly, so no load along K is masked (a mask there costs
the byte loads their vector width: 0.38-0.42x of bf16 against 0.6-0.75x without, measured). A byte's
high nibble is the even element and its low nibble the odd one: they multiply x's even and odd
elements, so the codes are never interleaved back. The 16 codes are held in registers and looked up
with `tl.gather`, not read from memory per weight; code x activation products are
summed in float32 and each byte's pair is scaled by its row's absmax, so the weight itself is never
formed nor rounded to the compute dtype (the reference rounds it: the two differ by that rounding,
within 2^-10 of the largest output in fp16). A [BLOCK_N, BLOCK_K / 2] accumulator is reduced once at
the end. Each slice's sums go to a float32 [SPLIT_K, N] that the caller adds up in a fixed order
(fxquant/ops/gemv_4bit.py: the op, and Inductor's decomposition that fuses the sum into the consumer).

Measured on the H200 (benchmarks/RESULTS.md): tensor-core variants of this kernel (`tl.dot` on the
tile dequantized in registers) ran at 0.07-0.13x of bf16's cuBLAS at M = 1 and 16 (twelfth
session); the global-memory lookup with the weight rounded per element, 128 rows and four warps a
program, 0.58-0.69x at M = 1; this kernel 0.90-1.14x (fifteenth session; the variants measured on
the way are in benchmarks/results/gemm_4bit_lookup_probe_h200_2026-12-02-s15.txt). More rows
dequantize once and run cuBLAS (fxquant/ops/blockwise_4bit.py chooses by M).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fxquant.ops.blockwise_4bit import NESTED_BLOCKSIZE

BLOCK_N = 32  # with one warp a program: 1.0-1.2x of bf16 where 64 or 128 rows (1 to 8 warps) gave 0.75-1.0x
MAX_BLOCK_K = 128  # elements a step reads per row (64 bytes), and at most one absmax block
MIN_K_PER_SPLIT = 256  # shorter slices spend more on the prologue than they stream
PROGRAMS_PER_SM = 64  # one-warp programs; 32 to 256 per SM measured the same


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
    codes = tl.load(code_ptr + tl.arange(0, 16))

    acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    for step in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + step
        byte = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rj)[None, :], mask=mask_n[:, None], other=0)
        block = rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE
        absmax_q = tl.load(absmax_q_ptr + block, mask=mask_n, other=0).to(tl.int32)
        absmax = tl.load(dynamic_map_ptr + absmax_q) * tl.load(nested_ptr + block // NESTED, mask=mask_n, other=0.0) + offset
        even = tl.reshape(tl.gather(codes, tl.reshape((byte >> 4).to(tl.int32), (BLOCK_N * BLOCK_K // 2,)), 0), (BLOCK_N, BLOCK_K // 2))
        odd = tl.reshape(tl.gather(codes, tl.reshape((byte & 0xF).to(tl.int32), (BLOCK_N * BLOCK_K // 2,)), 0), (BLOCK_N, BLOCK_K // 2))
        x_even = tl.load(x_ptr + k0 + 2 * rj).to(tl.float32)
        x_odd = tl.load(x_ptr + k0 + 2 * rj + 1).to(tl.float32)
        acc += (even * x_even[None, :] + odd * x_odd[None, :]) * absmax[:, None]

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


def gemv_4bit_partials(x: torch.Tensor, w_q: torch.Tensor, absmax_q: torch.Tensor, nested_absmax: torch.Tensor,
                       offset: torch.Tensor, code: torch.Tensor, dynamic_map: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x [1, K] (bf16, fp16 or fp32: the compute dtype) @ the 4-bit weight [N, K] as float32 sums over
    K's slices, [splits_for(N, K, blocksize, x.device), N]: their sum is the product."""
    m, k = x.shape
    n = w_q.shape[0]
    assert fits(m) and w_q.shape[1] * 2 == k and k % blocksize == 0, (x.shape, w_q.shape, blocksize)
    x = x.contiguous()
    splits = splits_for(n, k, blocksize, x.device)
    partial = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    _gemv_4bit_kernel[(triton.cdiv(n, BLOCK_N), splits)](
        x, w_q, absmax_q, nested_absmax, offset, code, dynamic_map, partial, n, k,
        K_PER_SPLIT=k // splits, BLOCKSIZE=blocksize, NESTED=NESTED_BLOCKSIZE, BLOCK_N=BLOCK_N, BLOCK_K=block_k_for(blocksize),
        num_warps=1, num_stages=3,
    )
    return partial


def splits_for(n: int, k: int, blocksize: int, device: torch.device) -> int:
    """How many K slices the kernel takes on `device` (its SM count)."""
    return split_k_for(n, k, blocksize, _sm_count(device))
