"""fxquant's int8 rowwise GEMM as an Inductor Triton template (its configs per M bucket and GPU:
fxquant/inductor/tuning.py, shared with the FP8 template: both stream one-byte operands).

    out[M, N] = float32(A[M, K] @ W[N, K].T) * A_SCALE[M, 1] * W_SCALE[1, N]      int8 in, int32 accumulate

fxquant/kernels/fp8_rowwise_gemm.py's source with an int32 accumulator: int8 tensor cores (`tl.dot`
with an int32 accumulator, exact), the scales applied in the epilogue in the reference's order, then Inductor's
own epilogue (the bias add, the cast to the activation dtype) fused behind `store_output`. W is
read K-major as the layer stores it.
"""

from __future__ import annotations

from fxquant.kernels.fp8_rowwise_gemm import rowwise_gemm_template

int8_rowwise_gemm_template = rowwise_gemm_template("fxquant_int8_rowwise_gemm", "tl.int32")
