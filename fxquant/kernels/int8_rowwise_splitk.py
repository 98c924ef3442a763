"""Split-K int8 rowwise GEMM for decode (M <= 16): more programs than output tiles; and the same kernel
unsplit with the template's tiles for more rows, where M is known only at run time.

    out[M, N] = float32(A[M, K] @ W[N, K].T) * A_SCALE[M] * W_SCALE[N]      int8 in, int32 accumulate,
                                                                          float32 scaling, out in its dtype

The int8 twin of fxquant/kernels/fp8_rowwise_splitk.py (same tiles and split rule: at M <= 16 the GEMM
streams the weight once, and its speed is how many programs keep loads in flight). The partial sums
are integers, so they are added exactly: each program writes its int32 partial to a workspace
[SPLIT_K, M, N], and a second kernel adds them and applies the scales, as the reference does
(`float(acc) * x_scale * w_scale`, rounded once to the output's dtype), so every split gives the
reference's bits. With SPLIT_K = 1 the GEMM kernel scales and stores the output itself.

`int8_rowwise_mm_tiled` runs it for M > 16 (the op's run-time pick for a dynamic M, fxquant/ops/int8.py):
SPLIT_K = 1 and the tile config the Inductor template takes without autotuning for that M
(fxquant/inductor/tuning.py). As in the template (and so at decode too), rows and columns past M and
N wrap around (loaded, never stored) and a K of whole steps loads unmasked. The M tiles are the
grid's first axis, so the programs in flight share weight tiles: the weight streams from memory
about once, the activation stays in L2. On Hopper
it beat cuBLAS's `_int_mm` (an sm80 kernel there) by 1.2-1.4x at M = 2048 as the template
(benchmarks/RESULTS.md, twelfth session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxquant.inductor.tuning import device_tuning
from fxquant.kernels.fp8_rowwise_splitk import BLOCK_K, BLOCK_M, BLOCK_N, MAX_ROWS, k_slices, output_and_operands


@triton.jit
def _int8_splitk_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, out_ptr,
    M, N, K, stride_am, stride_wn,
    K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCALED: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    a_rows = rm % M  # rows past M (and N) wrap around: loaded, computed, never stored
    w_rows = rn % N
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + w_rows[None, :] * stride_wn + rk[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K_PER_SPLIT, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k)
            w = tl.load(w_ptrs + k)
        else:
            in_k = rk + k < K
            a = tl.load(a_ptrs + k, mask=in_k[None, :], other=0)
            w = tl.load(w_ptrs + k, mask=in_k[:, None], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)

    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SCALED:
        a_scale = tl.load(a_scale_ptr + a_rows)
        w_scale = tl.load(w_scale_ptr + w_rows)
        out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)


@triton.jit
def _sum_and_scale_kernel(partial_ptr, a_scale_ptr, w_scale_ptr, out_ptr, N, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    total = tl.zeros((BLOCK,), dtype=tl.int32)
    for split in range(SPLIT_K):
        total += tl.load(partial_ptr + split * numel + offsets, mask=mask, other=0)
    a_scale = tl.load(a_scale_ptr + offsets // N, mask=mask, other=0.0)
    w_scale = tl.load(w_scale_ptr + offsets % N, mask=mask, other=0.0)
    out = total.to(tl.float32) * a_scale * w_scale
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def int8_rowwise_mm_splitk(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fxquant::int8_rowwise_mm for M <= MAX_ROWS: x_q [M, K], w_q [N, K] int8, x_scale [M], w_scale [N] float32."""
    m, k = x_q.shape
    n = w_q.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fxquant: the split-K GEMM handles up to {MAX_ROWS} rows, got M={m}")
    out, operands = output_and_operands(x_q, w_q, x_scale, w_scale, out_dtype)
    if operands is None:
        return out
    x_q, w_q, x_scale, w_scale = operands
    split_k, k_per_split = k_slices(n, k, x_q.device)
    partial = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.int32, device=x_q.device)
    _int8_splitk_kernel[(1, triton.cdiv(n, BLOCK_N), split_k)](
        x_q, w_q, x_scale, w_scale, partial, m, n, k, x_q.stride(0), w_q.stride(0),
        K_PER_SPLIT=k_per_split, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SCALED=split_k == 1,
        EVEN_K=k_per_split * split_k == k, num_warps=4, num_stages=4,
    )
    if split_k > 1:
        block = 1024
        _sum_and_scale_kernel[(triton.cdiv(m * n, block),)](
            partial, x_scale, w_scale, out, n, m * n, SPLIT_K=split_k, BLOCK=block)
    return out


def int8_rowwise_mm_tiled(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fxquant::int8_rowwise_mm for any M in one pass (no split): x_q [M, K], w_q [N, K] int8, x_scale [M],
    w_scale [N] float32; the template's heuristic tile for (M, N, K) on this GPU."""
    m, k = x_q.shape
    n = w_q.shape[0]
    out, operands = output_and_operands(x_q, w_q, x_scale, w_scale, out_dtype)
    if operands is None:
        return out
    x_q, w_q, x_scale, w_scale = operands
    tile = device_tuning(x_q.device).heuristic_config(m, n, k)
    _int8_splitk_kernel[(triton.cdiv(m, tile.block_m), triton.cdiv(n, tile.block_n), 1)](
        x_q, w_q, x_scale, w_scale, out, m, n, k, x_q.stride(0), w_q.stride(0),
        K_PER_SPLIT=triton.cdiv(k, tile.block_k) * tile.block_k, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, SCALED=True, EVEN_K=k % tile.block_k == 0, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out
