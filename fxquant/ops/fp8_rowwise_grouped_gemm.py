"""The grouped GEMM of fp8_rowwise's expert ops, on operands already quantized, and its CUDA kernels.

    fp8_rowwise_grouped_gemm(x_q [S, K] e4m3, w_q [E, N, K] e4m3, x_scale [S], w_scale [E, N], offsets [E])
        → bf16 [S, N]: the rows of group g (offsets[g-1] <= s < offsets[g]) times expert g, rescaled per
          row and per expert and output channel; rows past offsets[-1] are unspecified on CUDA (0 here)

What the expert ops' CUDA implementations and their Inductor decomposition leave once the activation
quantization is done (fxquant/ops/fp8_rowwise_experts.py, fxquant/inductor/decompositions.py); its
lowering picks a kernel per shape (fxquant/inductor/fp8_rowwise_grouped_mm.py). The kernels, each an op
as well so that AOTInductor's C++ wrapper can call it:
    scaled_grouped_mm_rowwise   `torch._scaled_grouped_mm` (CUTLASS, torch's own), where torch has it
    fbgemm_grouped_rowwise      FBGEMM's `f8f8bf16_rowwise_grouped_stacked`, where fbgemm-gpu-genai imports
    triton_grouped_rowwise      fxquant's Triton kernel (fxquant/kernels/fp8_rowwise_grouped_gemm.py)
None reads the offsets back to the host: each runs in a CUDA graph. The library kernels need K and N
multiples of 16 (16-byte rows of e4m3 operands and bf16 output); the Triton kernel takes any shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_common import FP8_DTYPE

LIBRARY_ALIGNMENT = 16


def check_grouped_gemm_inputs(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, offsets: Tensor) -> None:
    op = "fxquant::fp8_rowwise_grouped_gemm"
    torch._check(x_q.dim() == 2 and x_q.dtype == FP8_DTYPE, lambda: f"{op}: x_q must be {FP8_DTYPE} [S, K]")
    torch._check(w_q.dim() == 3 and w_q.dtype == FP8_DTYPE, lambda: f"{op}: w_q must be {FP8_DTYPE} [E, N, K]")
    torch._check(x_q.shape[1] == w_q.shape[2], lambda: f"{op}: x_q has K={x_q.shape[1]}, w_q is [E, N, K={w_q.shape[2]}]")
    torch._check(tuple(x_scale.shape) == (x_q.shape[0],), lambda: f"{op}: x_scale must be [S={x_q.shape[0]}]")
    torch._check(tuple(w_scale.shape) == tuple(w_q.shape[:2]), lambda: f"{op}: w_scale must be [E, N]")
    torch._check(offsets.dim() == 1 and offsets.shape[0] == w_q.shape[0] and not offsets.is_floating_point(),
                 lambda: f"{op}: offsets must be 1-D integer [E={w_q.shape[0]}]")


def grouped_gemm_output(x_q: Tensor, w_q: Tensor) -> Tensor:
    return x_q.new_empty((x_q.shape[0], w_q.shape[1]), dtype=torch.bfloat16)


@torch.library.custom_op("fxquant::fp8_rowwise_grouped_gemm", mutates_args=())
def fp8_rowwise_grouped_gemm(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    """The grouped GEMM (reference implementation: exact e4m3 products summed in float32, then the scales)."""
    check_grouped_gemm_inputs(x_q, w_q, x_scale, w_scale, offsets)
    acc = x_q.new_zeros((x_q.shape[0], w_q.shape[1]), dtype=torch.float32)
    row_scale = torch.zeros_like(acc)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        end = min(end, x_q.shape[0])
        if end > start:
            acc[start:end] = x_q[start:end].float() @ w_q[expert].float().t()
            row_scale[start:end] = w_scale[expert]
        start = max(start, end)
    return (acc * x_scale.unsqueeze(-1) * row_scale).to(torch.bfloat16)


@fp8_rowwise_grouped_gemm.register_fake
def _(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    check_grouped_gemm_inputs(x_q, w_q, x_scale, w_scale, offsets)
    return grouped_gemm_output(x_q, w_q)


def scaled_grouped_mm_rowwise(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    """The grouped GEMM by `torch._scaled_grouped_mm`: w_q [E, N, K] transposed is the column-major
    [E, K, N] it wants, with no copy; offsets int32."""
    if x_q.shape[0] == 0:  # no rows: nothing to ask of CUTLASS
        return grouped_gemm_output(x_q, w_q)
    return torch._scaled_grouped_mm(
        x_q.contiguous(), w_q.transpose(-2, -1), x_scale.contiguous(), w_scale.contiguous(),
        offs=offsets.to(torch.int32), out_dtype=torch.bfloat16, use_fast_accum=True,
    )


def fbgemm_grouped_rowwise(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    """The grouped GEMM by FBGEMM's `f8f8bf16_rowwise_grouped_stacked` (CUTLASS), which takes rows per
    group (int64) rather than their running sum."""
    if not fbgemm_genai_available():
        raise RuntimeError("fxquant: this compiled graph calls FBGEMM's f8f8bf16_rowwise_grouped_stacked, but "
                           "fbgemm-gpu-genai does not load in this process (the log says why)")
    m_sizes = torch.diff(offsets.to(torch.int64), prepend=offsets.new_zeros(1, dtype=torch.int64))
    return torch.ops.fbgemm.f8f8bf16_rowwise_grouped_stacked(
        x_q.contiguous(), w_q.contiguous(), x_scale.contiguous(), w_scale.contiguous(), m_sizes)


def triton_grouped_rowwise(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    """The grouped GEMM by fxquant's Triton kernel, imported on first use (triton: GPU machines only)."""
    from fxquant.kernels.fp8_rowwise_grouped_gemm import fp8_rowwise_grouped_gemm_triton

    return fp8_rowwise_grouped_gemm_triton(x_q, w_q, x_scale, w_scale, offsets)


KERNELS = {"scaled_grouped_mm": scaled_grouped_mm_rowwise, "fbgemm": fbgemm_grouped_rowwise, "triton": triton_grouped_rowwise}


def library_shape(n: int, k: int) -> bool:
    """Whether the library kernels take an expert weight of N x K (16-byte aligned rows)."""
    return n % LIBRARY_ALIGNMENT == 0 and k % LIBRARY_ALIGNMENT == 0


def available_kernels(n: int, k: int) -> tuple[str, ...]:
    """The kernels that can run an N x K expert weight here, the library ones in the order they ranked
    at many rows an expert (`kernel_for`): FBGEMM's where fbgemm-gpu-genai imports, torch's where it
    has `_scaled_grouped_mm`; then fxquant's Triton kernel, which runs any shape."""
    library = library_shape(n, k)
    found = []
    if library and fbgemm_genai_available() and hasattr(torch.ops.fbgemm, "f8f8bf16_rowwise_grouped_stacked"):
        found.append("fbgemm")
    if library and hasattr(torch, "_scaled_grouped_mm"):
        found.append("scaled_grouped_mm")
    return (*found, "triton")


# Measured on the H200 (benchmarks/RESULTS.md, `on_device.sh moe kernels`, eleventh session), tokens
# spread evenly: fxquant's Triton kernel was the fastest at up to 64 rows an expert on every
# Qwen3-30B-A3B and Mixtral-8x7B expert shape (by up to 1.7x), FBGEMM's from 256 rows an expert on
# 6 of 8 (torch's within 2-4 % on the other 2; torch's 1.9x slower than FBGEMM's at Mixtral's 256).
TRITON_MAX_ROWS_PER_EXPERT = 128


def kernel_for(rows: int, experts: int, n: int, k: int) -> str:
    """The kernel for `rows` activation rows over `experts` experts of N x K, without autotuning: the
    Triton kernel up to TRITON_MAX_ROWS_PER_EXPERT rows an expert on average, else the first library
    kernel available (`available_kernels`)."""
    if rows <= TRITON_MAX_ROWS_PER_EXPERT * experts:
        return "triton"
    return available_kernels(n, k)[0]


def grouped_gemm_by_shape(x_q: Tensor, w_q: Tensor, x_scale: Tensor, w_scale: Tensor, offsets: Tensor) -> Tensor:
    """The op's CUDA kernel, and the lowering's choice where the rows are known only at run time: the
    kernel `kernel_for` picks for these rows and this weight."""
    if x_q.shape[0] == 0:
        return grouped_gemm_output(x_q, w_q)
    experts, n, k = w_q.shape
    return KERNELS[kernel_for(x_q.shape[0], experts, n, k)](x_q, w_q, x_scale, w_scale, offsets)


fp8_rowwise_grouped_gemm.register_kernel("cuda")(grouped_gemm_by_shape)


def _register_kernel_op(function) -> None:
    """`function` as the op fxquant::<its name>: what AOTInductor's C++ wrapper calls for that choice."""
    name = f"fxquant::{function.__name__}"
    op = torch.library.custom_op(name, function, mutates_args=())
    op.register_fake(lambda x_q, w_q, x_scale, w_scale, offsets: grouped_gemm_output(x_q, w_q))


for _function in (*KERNELS.values(), grouped_gemm_by_shape):
    _register_kernel_op(_function)
