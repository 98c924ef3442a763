"""Triton GEMM for FP8 blockwise scaling (DeepSeek-V3): C = sum_kb (A_kb @ B_kb.T) * a_scale[m, kb] * b_scale[n // block_n, kb].

A [M, K] e4m3 with one scale per row per K-block (the activations, 1 x block_k groups);
B [N, K] e4m3 with one scale per (block_n x block_k) block (the weights). Each program owns a
BLOCK_M x BLOCK_N tile of C; its main loop steps over K one weight block at a time
(BLOCK_K = block_k), takes that block's fp8 dot product in float32 and scales it by the block's
activation and weight scales before accumulating, as the CPU reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_blockwise_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr,
    M, N, K,
    stride_am, stride_bn, stride_cm, stride_a_scale_m, stride_b_scale_n,
    SCALE_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: neighbouring programs share B tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
    a_scale_ptrs = a_scale_ptr + offs_m * stride_a_scale_m
    b_scale_ptrs = b_scale_ptr + (offs_n // SCALE_BLOCK_N) * stride_b_scale_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        a_scale = tl.load(a_scale_ptrs + kb, mask=mask_m, other=0.0)
        b_scale = tl.load(b_scale_ptrs + kb, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _tile_config(m: int) -> dict:
    """Tile sizes by token count: narrow tiles for decode, wide ones for prefill."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def fp8_blockwise_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, block_n: int, block_k: int
) -> torch.Tensor:
    """bf16 [M, N] = blockwise-scaled a [M, K] @ b [N, K].T; a_scale [M, K / block_k], b_scale [N / block_n, K / block_k]."""
    m, k = a.shape
    n = b.shape[0]
    a, b = a.contiguous(), b.contiguous()
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    c = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    if m == 0:
        return c
    config = _tile_config(m)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _fp8_blockwise_gemm_kernel[grid](
        a, a_scale, b, b_scale, c, m, n, k,
        a.stride(0), b.stride(0), c.stride(0), a_scale.stride(0), b_scale.stride(0),
        SCALE_BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, **config,
    )
    return c
