"""FP8 blockwise grouped GEMM (DeepSeek-V3-style expert weights): each expert's group of rows times that
expert, with 128 x 128 (block_n x block_k) weight blocks and 1 x block_k activation groups.

    out[s, n] = sum_kb (A[s, kb] . W[g, n, kb]) * A_SCALE[s, kb] * W_SCALE[g, n // block_n, kb]
                for OFFSETS[g-1] <= s < OFFSETS[g]; e4m3 in, fp32 accumulate, bf16 out; rows past
                OFFSETS[-1] are not written

The blockwise form of fxquant/kernels/fp8_rowwise_grouped_gemm.py (whose `group_row_tile` finds each
program's group on the device: no host sync, CUDA graphs): the main loop steps over K one weight block
at a time (BLOCK_K = block_k) and scales each block's fp8 dot product before accumulating, as
fxquant/kernels/fp8_blockwise_gemm.py does for one weight. The CUDA kernel of the op
fxquant::fp8_blockwise_grouped_gemm (fxquant/ops/fp8_blockwise_grouped_gemm.py), which fp8_blockwise's
expert ops and their Inductor decompositions call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxquant.kernels.fp8_rowwise_grouped_gemm import group_row_tile, row_tiles_bound


@triton.jit
def _blockwise_grouped_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, offsets_ptr, out_ptr,
    M, N, K, E, stride_am, stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    SCALE_BLOCK_N: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group, row_start, row_end = group_row_tile(offsets_ptr, M, E, pid_m, E_POW2, BLOCK_M)
    if group >= E:
        return

    rm = row_start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    in_m = rm < row_end
    a_rows = tl.where(in_m, rm, row_start)  # rows past the group read its first row: computed, never stored
    w_rows = rn % N
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + group.to(tl.int64) * stride_we + w_rows[None, :] * stride_wn + rk[:, None]
    a_scale_ptrs = a_scale_ptr + a_rows * stride_as
    w_scale_ptrs = w_scale_ptr + group * stride_se + (w_rows // SCALE_BLOCK_N) * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        a_scale = tl.load(a_scale_ptrs + kb)
        w_scale = tl.load(w_scale_ptrs + kb)
        acc += tl.dot(a, w) * a_scale[:, None] * w_scale[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & (rn[None, :] < N))


def _tile_config(rows: int, experts: int, block_n: int) -> dict:
    """Tile sizes by the rows per expert on average (BLOCK_N within one weight block's rows)."""
    per_expert = rows / max(experts, 1)
    block_m, num_warps = (16, 4) if per_expert <= 16 else (64, 4) if per_expert <= 64 else (128, 8)
    return dict(BLOCK_M=block_m, BLOCK_N=min(block_n, 128 if block_m > 16 else 64), num_warps=num_warps, num_stages=3)


def fp8_blockwise_grouped_gemm(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor,
) -> torch.Tensor:
    """x_q [S, K] e4m3 with x_scale [S, K / block_k]; w_q [E, N, K] e4m3 with w_scale [E, N / block_n,
    K / block_k] float32; offsets [E] integer (non-decreasing) → bf16 [S, N]; rows past offsets[-1]
    are left unwritten. N and K must be whole numbers of blocks."""
    s, k = x_q.shape
    e, n, _ = w_q.shape
    block_n, block_k = n // w_scale.shape[1], k // w_scale.shape[2]
    if block_n * w_scale.shape[1] != n or block_k * w_scale.shape[2] != k or x_scale.shape != (s, k // block_k):
        raise ValueError(f"fxquant: blockwise grouped GEMM: weight [{e}, {n}, {k}] with scales {list(w_scale.shape)} "
                         f"and activation scales {list(x_scale.shape)} are not whole blocks of one size")
    out = torch.empty((s, n), dtype=torch.bfloat16, device=x_q.device)
    if s == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    x_q, x_scale, w_q, w_scale = x_q.contiguous(), x_scale.contiguous(), w_q.contiguous(), w_scale.contiguous()
    config = _tile_config(s, e, block_n)
    grid = (row_tiles_bound(s, e, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
    _blockwise_grouped_gemm_kernel[grid](
        x_q, x_scale, w_q, w_scale, offsets.contiguous(), out,
        s, n, k, e, x_q.stride(0), x_scale.stride(0), w_q.stride(0), w_q.stride(1), w_scale.stride(0),
        w_scale.stride(1), out.stride(0),
        SCALE_BLOCK_N=block_n, E_POW2=triton.next_power_of_2(e), BLOCK_K=block_k, **config,
    )
    return out
