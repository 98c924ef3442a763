"""fxquant's FP8 rowwise grouped GEMM (MoE experts): each expert's group of rows times that expert.

    out[s, :] = (A[s, :] @ W[g].T) * A_SCALE[s] * W_SCALE[g, :]    for OFFSETS[g-1] <= s < OFFSETS[g]
    e4m3 in, fp32 accumulate, bf16 out; rows past OFFSETS[-1] are not written

A program owns one BLOCK_M x BLOCK_N tile of one group. The tiles of each group are counted on the
device, from OFFSETS (non-decreasing, as a cumulative sum of tokens per expert is), so nothing is read
back to the host and the kernel can be captured in a CUDA graph: the grid has an upper bound of row
tiles (`row_tiles_bound`), and the programs past the groups' last tile return at once. W is read
K-major as the scheme stores it ([E, N, K]); the scales are applied in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def group_row_tile(offsets_ptr, M, E, pid_m, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(group, first row, end of the group's rows) of row tile `pid_m`; group >= E: past the last tile.
    The tiles per group come from the offsets, then their running sum (also used by
    fxquant/kernels/fp8_blockwise_grouped_gemm.py)."""
    groups = tl.arange(0, E_POW2)
    in_e = groups < E
    ends = tl.minimum(tl.load(offsets_ptr + groups, mask=in_e, other=0), M)
    starts = tl.minimum(tl.load(offsets_ptr + groups - 1, mask=in_e & (groups > 0), other=0), M)
    tiles = tl.where(in_e, (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_through = tl.cumsum(tiles, 0)
    group = tl.sum((tiles_through <= pid_m).to(tl.int32), 0)
    this = groups == group
    first_tile = tl.sum(tl.where(this, tiles_through - tiles, 0), 0)
    row_start = tl.sum(tl.where(this, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(this, ends, 0), 0)
    return group, row_start, row_end


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, offsets_ptr, out_ptr,
    M, N, K, E, K_PER_SPLIT, stride_am, stride_we, stride_wn, stride_se, stride_om,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    group, row_start, row_end = group_row_tile(offsets_ptr, M, E, pid_m, E_POW2, BLOCK_M)
    if group >= E:
        return

    rm = row_start + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * K_PER_SPLIT
    rk = k_start + tl.arange(0, BLOCK_K)
    in_m = rm < row_end
    a_rows = tl.where(in_m, rm, row_start)  # rows past the group read its first row: computed, never stored
    w_rows = rn % N
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + group.to(tl.int64) * stride_we + w_rows[None, :] * stride_wn + rk[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(tl.minimum(K - k_start, K_PER_SPLIT), BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            in_k = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    a_scale = tl.load(a_scale_ptr + a_rows)
    w_scale = tl.load(w_scale_ptr + group * stride_se + w_rows)
    acc = acc * a_scale[:, None] * w_scale[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if SPLIT_K > 1:  # this slice's scaled sums, to the float32 workspace [SPLIT_K, M, N]
        out_ptrs += pid_k * M * N
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & (rn[None, :] < N))


@triton.jit
def _sum_splits_in_groups_kernel(partial_ptr, offsets_ptr, out_ptr, M, N, E, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[s, n] = the SPLIT_K partial sums of [SPLIT_K, M, N] added in order, for the rows in a group
    (s < OFFSETS[-1]): the rows past them stay unwritten, as SPLIT_K = 1 leaves them."""
    rows = tl.minimum(tl.load(offsets_ptr + E - 1), M)
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < rows * N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLIT_K):
        total += tl.load(partial_ptr + split * M * N + index, mask=mask, other=0.0)
    tl.store(out_ptr + index, total.to(out_ptr.dtype.element_ty), mask=mask)


def row_tiles_bound(rows: int, experts: int, block_m: int) -> int:
    """At most how many BLOCK_M-row tiles `rows` rows in `experts` groups make: the groups' whole tiles
    are at most rows // BLOCK_M together, each group with rows adds at most one partial tile, and at most
    min(experts, rows) groups have rows (decode's 8 rows over 128 experts: 8 tiles, not 129)."""
    return rows // block_m + min(experts, rows)


def grouped_config(rows: int, experts: int) -> dict:
    """Tile sizes by the rows per expert on average: 16-row tiles where experts see few tokens (decode,
    MoE with many experts), wider ones as the groups grow."""
    per_expert = rows / max(experts, 1)
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)


def candidate_configs(rows: int, experts: int) -> list[dict]:
    """The tiles benchmarks/moe.py's `configs` part times against `grouped_config`'s for these rows (the
    data a per-GPU choice will come from): at few rows an expert, 16-row tiles with narrower or wider
    N and longer K steps, and K split over 2 or 4 programs (more loads in flight: decode's 8 rows fill
    192 programs on 132 SMs with 64-wide tiles); with more rows, 32- to 128-row tiles. In the
    eighteenth session's sweep (H200, before the split-K candidates) no single tile beat the defaults."""
    if rows / max(experts, 1) <= 16:
        tiles = [(16, n, k, 1) for n in (32, 64, 128) for k in (128, 256)]
        tiles += [(16, n, 128, split) for n in (64, 128) for split in (2, 4)]
    else:
        tiles = [(m, n, 128, 1) for m in (32, 64, 128) for n in (64, 128, 256) if m * n <= 128 * 128]
    configs = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=4 if m * n <= 64 * 128 else 8, num_stages=stages,
                    **({"SPLIT_K": split} if split > 1 else {}))
               for m, n, k, split in tiles for stages in (3, 4)]
    return [grouped_config(rows, experts)] + [config for config in configs if config != grouped_config(rows, experts)]


def k_slices(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(slices, length of each): K cut into at most `split_k` slices of whole BLOCK_K steps (rounding
    the length up may leave fewer slices)."""
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def fp8_rowwise_grouped_gemm_triton(
    x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """x_q [S, K] e4m3, w_q [E, N, K] e4m3, x_scale [S], w_scale [E, N] float32, offsets [E] integer
    (non-decreasing) → bf16 [S, N]; rows past offsets[-1] are left unwritten. `config`: the tiles
    (`candidate_configs`' form; SPLIT_K > 1 adds the slices' float32 sums in a second kernel), else
    `grouped_config`'s."""
    s, k = x_q.shape
    e, n, _ = w_q.shape
    out = torch.empty((s, n), dtype=torch.bfloat16, device=x_q.device)
    if s == 0 or n == 0:
        return out
    if k == 0:  # empty sums
        return out.zero_()
    x_q, w_q, x_scale, w_scale = x_q.contiguous(), w_q.contiguous(), x_scale.contiguous(), w_scale.contiguous()
    offsets = offsets.contiguous()
    config = dict(config or grouped_config(s, e))
    split_k, k_per_split = k_slices(k, config.pop("SPLIT_K", 1), config["BLOCK_K"])
    partial = out if split_k == 1 else torch.empty((split_k, s, n), dtype=torch.float32, device=x_q.device)
    grid = (row_tiles_bound(s, e, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), split_k)
    _grouped_gemm_kernel[grid](
        x_q, w_q, x_scale, w_scale, offsets, partial,
        s, n, k, e, k_per_split, x_q.stride(0), w_q.stride(0), w_q.stride(1), w_scale.stride(0), out.stride(0),
        E_POW2=triton.next_power_of_2(e), EVEN_K=k % config["BLOCK_K"] == 0, SPLIT_K=split_k, **config,
    )
    if split_k > 1:
        block = 1024
        _sum_splits_in_groups_kernel[(triton.cdiv(s * n, block),)](partial, offsets, out, s, n, e, SPLIT_K=split_k, BLOCK=block)
    return out
