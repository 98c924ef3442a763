"""Fused 4-bit dequantize + GEMV / GEMM for a few activation rows (decode): bitsandbytes' NF4 / FP4
weights read as packed bytes and dequantized in registers, never written out.

    out[M, N] = x[M, K] @ W[N, K].T,   W[n, k] = CODE[nibble(n, k)] * absmax(n, k // blocksize)
    absmax    = DYNAMIC_MAP[absmax_q] * nested_absmax[block // 256] + offset      (double quantization)

At decode the product streams the weight once and does little math, so what counts is bytes (a
quarter of bf16's), loads in flight and the instructions spent per weight. Both kernels cut K into
equal slices (split-K: enough programs to fill the SMs; no load along K is masked, as a mask there
costs the byte loads their vector width: 0.38-0.42x of bf16 against 0.6-0.75x without, measured)
and write each slice's float32 sums to [SPLIT_K, M, N], which the caller adds up in a fixed order
(fxquant/ops/linear_4bit_partials.py: the op, and Inductor's decomposition that fuses the sum into
the consumer). A byte's high nibble is the even element and its low nibble the odd one: they multiply
x's even and odd elements, so the codes are never interleaved back. The 16 codes are held in
registers and looked up with `tl.gather`, not read from memory per weight.

One row (`_gemv_4bit_kernel`, CUDA cores): each program (one warp) takes a BLOCK_N slice of outputs
and walks its slice of K BLOCK_K elements at a time, within one absmax block, so a step needs one
absmax per row. Code x activation products are summed in float32 and each byte's pair is scaled by
its row's absmax, so the weight itself is never formed nor rounded to the compute dtype (the
reference rounds it: the two differ by that rounding, within 2^-10 of the largest output in fp16).
A [BLOCK_N, BLOCK_K / 2] accumulator is reduced once at the end.

2 to 16 rows (`_gemm_4bit_mma_kernel`, tensor cores): the dequantized [MMA_BLOCK_N, BLOCK_K / 2]
even and odd halves of a step, rounded to the compute dtype, are the MMA's M side and x's even and
odd columns (padded to 16 rows) its N side ("swap AB": 16 rows are below the MMA's smallest M); a
step spans one or more absmax blocks. On the H100 (twentieth session, benchmarks/RESULTS.md) the op
ran at 0.77-0.88x of bf16's cuBLAS at M = 16 (qkv, gate_up, down of Llama-3-8B) and 0.88-0.93x at
M = 4 (gate_up, down), where dequantize + cuBLAS ran at 0.29-0.34x (H200); with x as the MMA's M side
the best tile gave 0.65-0.84x, and with the codes read from memory instead of `tl.gather`
0.25-0.27x, as the twelfth session's tensor-core variants (0.07-0.13x on the H200) read them.

The GEMV, measured on the H200: the global-memory lookup with the weight rounded per element, 128
rows and four warps a program, 0.58-0.69x at M = 1; this kernel 0.90-1.14x (fifteenth session; the
variants measured on the way are in benchmarks/results/gemm_4bit_lookup_probe_h200_2026-12-02-s15.txt).
More than 16 rows dequantize once and run cuBLAS (fxquant/ops/blockwise_4bit.py chooses by M).
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
MAX_ROWS = 16  # the MMA kernel's rows (padded to 16, the MMA's smallest N)
MMA_BLOCK_N, MMA_BLOCK_K, MMA_WARPS, MMA_STAGES = 64, 128, 4, 3
MMA_PROGRAMS_PER_SM = 4


def fits(rows: int) -> bool:
    """Whether `rows` activation rows run these kernels (else: dequantize, then cuBLAS)."""
    return 1 <= rows <= MAX_ROWS


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


@triton.jit
def _gemm_4bit_mma_kernel(
    x_ptr, w_ptr, absmax_q_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_map_ptr, out_ptr, M, N, K,
    K_PER_SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rj = tl.arange(0, BLOCK_K // 2)  # the step's bytes along K
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1  # absmax blocks a step spans
    rb = tl.arange(0, GROUPS)
    mask_n = rn < N
    mask_m = rm < M
    offset = tl.load(offset_ptr)
    codes = tl.load(code_ptr + tl.arange(0, 16))

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the weight tile is the MMA's M side
    for step in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = pid_k * K_PER_SPLIT + step
        byte = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rj)[None, :], mask=mask_n[:, None], other=0)
        block = rn[:, None] * (K // BLOCKSIZE) + (k0 + rb * BLOCKSIZE)[None, :] // BLOCKSIZE
        absmax_q = tl.load(absmax_q_ptr + block, mask=mask_n[:, None], other=0).to(tl.int32)
        absmax = tl.load(dynamic_map_ptr + absmax_q) * tl.load(nested_ptr + block // NESTED, mask=mask_n[:, None], other=0.0) + offset
        absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (BLOCK_N, GROUPS, BLOCK_K // 2 // GROUPS)), (BLOCK_N, BLOCK_K // 2))
        even = tl.reshape(tl.gather(codes, tl.reshape((byte >> 4).to(tl.int32), (BLOCK_N * BLOCK_K // 2,)), 0), (BLOCK_N, BLOCK_K // 2))
        odd = tl.reshape(tl.gather(codes, tl.reshape((byte & 0xF).to(tl.int32), (BLOCK_N * BLOCK_K // 2,)), 0), (BLOCK_N, BLOCK_K // 2))
        x_even = tl.load(x_ptr + rm[None, :] * K + (k0 + 2 * rj)[:, None], mask=mask_m[None, :], other=0.0)
        x_odd = tl.load(x_ptr + rm[None, :] * K + (k0 + 2 * rj + 1)[:, None], mask=mask_m[None, :], other=0.0)
        acc = tl.dot((even * absmax).to(x_even.dtype), x_even, acc, input_precision=PRECISION)
        acc = tl.dot((odd * absmax).to(x_odd.dtype), x_odd, acc, input_precision=PRECISION)

    tl.store(out_ptr + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=mask_n[:, None] & mask_m[None, :])


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs to fill (an H100's 132 where the interpreter runs on CPU tensors)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def block_k_for(rows: int, k: int, blocksize: int) -> int:
    """Elements of K a step reads: within one absmax block for the GEMV; for the MMA kernel MMA_BLOCK_K
    where it divides K, else one absmax block (K is a multiple of the block size)."""
    if rows == 1:
        return min(blocksize, MAX_BLOCK_K)
    return MMA_BLOCK_K if k % MMA_BLOCK_K == 0 else min(blocksize, MMA_BLOCK_K)


def split_k_for(rows: int, n: int, k: int, blocksize: int, sms: int) -> int:
    """How many slices K is cut into: at most about the kernel's programs per SM, each slice at least
    MIN_K_PER_SPLIT long, and the most such that divides K's steps evenly."""
    block_n, per_sm = (BLOCK_N, PROGRAMS_PER_SM) if rows == 1 else (MMA_BLOCK_N, MMA_PROGRAMS_PER_SM)
    steps = k // block_k_for(rows, k, blocksize)
    wanted = triton.cdiv(per_sm * sms, triton.cdiv(n, block_n))
    most = max(1, min(wanted, k // MIN_K_PER_SPLIT, steps))
    return next(splits for splits in range(most, 0, -1) if steps % splits == 0)


def gemm_4bit_partials(x: torch.Tensor, w_q: torch.Tensor, absmax_q: torch.Tensor, nested_absmax: torch.Tensor,
                       offset: torch.Tensor, code: torch.Tensor, dynamic_map: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x [M, K] (bf16, fp16 or fp32: the compute dtype; M ≤ MAX_ROWS) @ the 4-bit weight [N, K].T as
    float32 sums over K's slices, [splits_for(M, N, K, blocksize, x.device), M, N]: their sum is the
    product. One row runs the GEMV, more the MMA kernel."""
    m, k = x.shape
    n = w_q.shape[0]
    assert fits(m) and w_q.shape[1] * 2 == k and k % blocksize == 0, (x.shape, w_q.shape, blocksize)
    x = x.contiguous()
    splits = splits_for(m, n, k, blocksize, x.device)
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    shared = dict(K_PER_SPLIT=k // splits, BLOCKSIZE=blocksize, NESTED=NESTED_BLOCKSIZE, BLOCK_K=block_k_for(m, k, blocksize))
    if m == 1:
        _gemv_4bit_kernel[(triton.cdiv(n, BLOCK_N), splits)](
            x, w_q, absmax_q, nested_absmax, offset, code, dynamic_map, partial, n, k, BLOCK_N=BLOCK_N, **shared,
            num_warps=1, num_stages=3,
        )
    else:
        _gemm_4bit_mma_kernel[(triton.cdiv(n, MMA_BLOCK_N), splits)](
            x, w_q, absmax_q, nested_absmax, offset, code, dynamic_map, partial, m, n, k, BLOCK_M=max(16, triton.next_power_of_2(m)),
            BLOCK_N=MMA_BLOCK_N, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **shared,  # fp32: no TF32
            num_warps=MMA_WARPS, num_stages=MMA_STAGES,
        )
    return partial


def splits_for(rows: int, n: int, k: int, blocksize: int, device: torch.device) -> int:
    """How many K slices the kernel for `rows` rows takes on `device` (its SM count)."""
    return split_k_for(rows, n, k, blocksize, _sm_count(device))
