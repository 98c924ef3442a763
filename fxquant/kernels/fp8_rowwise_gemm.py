"""fxquant's FP8 rowwise GEMM as an Inductor Triton template (its configs per M bucket and GPU:
fxquant/inductor/tuning.py).

    out[M, N] = (A[M, K] @ W[N, K].T) * A_SCALE[M, 1] * W_SCALE[1, N]      e4m3 in, fp32 accumulate

The scales are applied in the epilogue, before Inductor's own epilogue (a bias add, the cast to the
activation dtype) is fused behind `store_output`. W is read K-major as the layer stores it, so no
transpose is materialized. Small M (decode) gets its own configs: BLOCK_M = 16 (the smallest
tensor-core tile), narrow BLOCK_N so that there are enough programs to keep every SM streaming
weights, and long BLOCK_K with deep pipelining, since at M <= 16 the GEMM is a weight-bandwidth
problem.
"""

from __future__ import annotations

from torch._inductor.kernel.mm_common import mm_grid
from torch._inductor.select_algorithm import TritonTemplate

SOURCE = r"""
{{def_kernel("A", "W", "A_SCALE", "W_SCALE")}}
    M = {{size("A", 0)}}
    N = {{size("W", 0)}}
    K = {{size("A", 1)}}
    if M * N == 0:
        return
    stride_am = {{stride("A", 0)}}
    stride_ak = {{stride("A", 1)}}
    stride_wn = {{stride("W", 0)}}
    stride_wk = {{stride("W", 1)}}
    stride_as = {{stride("A_SCALE", 0)}}
    stride_ws = {{stride("W_SCALE", 0)}}

    pid = tl.program_id(0)
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    # grouped ordering: GROUP_M row blocks share the weight tiles they read while those are in L2
    width = GROUP_M * grid_n
    group_id = pid // width
    group_size = min(grid_m - group_id * GROUP_M, GROUP_M)
    pid_m = group_id * GROUP_M + (pid % group_size)
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = rm % M  # rows past M (and N) wrap around: loaded, computed, never stored
    w_rows = rn % N
    a_ptrs = A + a_rows[:, None] * stride_am + rk[None, :] * stride_ak
    w_ptrs = W + w_rows[None, :] * stride_wn + rk[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACCUMULATOR)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        {%- if EVEN_K %}
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        {%- else %}
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=ZERO)
        w = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=ZERO)
        {%- endif %}
        acc = tl.dot(a, w, acc, out_dtype=ACCUMULATOR)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    a_scale = tl.load(A_SCALE + a_rows * stride_as)
    w_scale = tl.load(W_SCALE + w_rows * stride_ws)
    out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]

    idx_m = rm[:, None]
    idx_n = rn[None, :]
    mask = (idx_m < M) & (idx_n < N)
    {{store_output(("idx_m", "idx_n"), "out", "mask", val_shape=("BLOCK_M", "BLOCK_N"))}}
"""


def rowwise_gemm_template(name: str, accumulator: str) -> TritonTemplate:
    """The template for one-byte operands accumulating in `accumulator`: "tl.float32" (FP8) or
    "tl.int32" (int8, exact; fxquant/kernels/int8_rowwise_gemm.py). SOURCE's ACCUMULATOR and ZERO (the
    masked loads' fill) are filled in as text, before Inductor renders the template."""
    zero = "0" if accumulator == "tl.int32" else "0.0"
    return TritonTemplate(name=name, grid=mm_grid, source=SOURCE.replace("ACCUMULATOR", accumulator).replace("ZERO", zero))


fp8_rowwise_gemm_template = rowwise_gemm_template("fxquant_fp8_rowwise_gemm", "tl.float32")
