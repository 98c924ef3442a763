"""Split-K FP8 rowwise GEMM for decode (M <= 16): more programs than output tiles.

    out[M, N] = (A[M, K] @ W[N, K].T) * A_SCALE[M] * W_SCALE[N]      e4m3 in, fp32 accumulate, bf16 out

At M <= 16 the GEMM streams the weight once and does almost no math, so its speed is how many
programs keep loads in flight. With one program per 16 x 32 output tile, N = 4096 (Llama's o_proj,
down_proj) gives 128 programs for 132 SMs on an H100. Here each tile's K range is also split
over SPLIT_K programs; each writes its scaled partial sum to an fp32 workspace [SPLIT_K, M, N], and
a second kernel adds the partials in a fixed order and rounds to bf16 (deterministic, unlike
atomics). With SPLIT_K = 1 the GEMM kernel stores bf16 directly and the second kernel is skipped.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fxquant.inductor.tuning import device_tuning

MAX_ROWS = 16  # one BLOCK_M tile: the kernel is for decode-sized M only
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 256
MIN_K_PER_SPLIT = 4 * BLOCK_K  # shorter slices spend more on the prologue than they stream


@triton.jit
def _splitk_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, out_ptr,
    M, N, K, stride_am, stride_wn,
    K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K_PER_SPLIT, BLOCK_K):
        in_k = rk + k < K
        a = tl.load(a_ptrs + k, mask=mask_m[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=mask_n[None, :] & in_k[:, None], other=0.0)
        acc = tl.dot(a, w, acc)

    a_scale = tl.load(a_scale_ptr + rm, mask=mask_m, other=0.0)
    w_scale = tl.load(w_scale_ptr + rn, mask=mask_n, other=0.0)
    acc = acc * a_scale[:, None] * w_scale[None, :]
    out_ptrs = out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLIT_K):
        total += tl.load(partial_ptr + split * numel + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs to fill (an H100's 132 where the interpreter runs on CPU tensors)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def output_and_operands(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                        dtype: torch.dtype) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The output [M, N] in `dtype` and the operands made contiguous; no operands where nothing is left to
    compute: no rows or columns (the output is empty) or no K (the output is zeros: empty sums)."""
    out = torch.empty((x_q.shape[0], w_q.shape[0]), dtype=dtype, device=x_q.device)
    if out.numel() == 0:
        return out, None
    if x_q.shape[1] == 0:
        return out.zero_(), None
    return out, (x_q.contiguous(), w_q.contiguous(), x_scale.contiguous(), w_scale.contiguous())


def split_k_for(n: int, k: int, sms: int, programs_per_sm: int) -> int:
    """How many slices K is cut into: enough programs for `programs_per_sm` per SM (the GPU's
    `splitk_programs_per_sm`, fxquant/inductor/tuning.py), each slice a whole number of BLOCK_K
    steps and at least MIN_K_PER_SPLIT long."""
    tiles = triton.cdiv(n, BLOCK_N)
    wanted = triton.cdiv(programs_per_sm * sms, tiles)
    return max(1, min(wanted, k // MIN_K_PER_SPLIT))


def k_slices(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(slices, length of each): K cut as `split_k_for` wants on `device`, each slice a whole number of
    BLOCK_K (rounding the length up may leave fewer slices)."""
    wanted = split_k_for(n, k, _sm_count(device), device_tuning(device).splitk_programs_per_sm)
    k_per_split = triton.cdiv(triton.cdiv(k, wanted), BLOCK_K) * BLOCK_K
    return triton.cdiv(k, k_per_split), k_per_split


def fp8_rowwise_mm_splitk(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """fxquant::fp8_rowwise_mm for M <= MAX_ROWS: x_q [M, K], w_q [N, K] e4m3, x_scale [M], w_scale [N] float32."""
    m, k = x_q.shape
    n = w_q.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fxquant: the split-K GEMM handles up to {MAX_ROWS} rows, got M={m}")
    out, operands = output_and_operands(x_q, w_q, x_scale, w_scale, torch.bfloat16)
    if operands is None:
        return out
    x_q, w_q, x_scale, w_scale = operands
    split_k, k_per_split = k_slices(n, k, x_q.device)
    partial = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x_q.device)
    _splitk_kernel[(triton.cdiv(n, BLOCK_N), split_k)](
        x_q, w_q, x_scale, w_scale, partial, m, n, k, x_q.stride(0), w_q.stride(0),
        K_PER_SPLIT=k_per_split, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=4,
    )
    if split_k > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](partial, out, m * n, SPLIT_K=split_k, BLOCK=block)
    return out
