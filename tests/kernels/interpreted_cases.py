"""Runs fxquant's Triton kernels on CPU tensors and reports each output against the exact float64
result; meant to run under TRITON_INTERPRET=1 (tests/kernels/test_interpreted_triton_kernels.py):

    TRITON_INTERPRET=1 python -m tests.kernels.interpreted_cases split_k '[{"m": 1, "n": 512, "k": 4096}]'
"""

import json
import sys

import torch

from fxquant.inductor.tuning import DEFAULT
from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight, quantize_fp8_groupwise
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

BF16_ULP = 2.0**-7


def split_k(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from fxquant.kernels.fp8_rowwise_splitk import fp8_rowwise_mm_splitk, split_k_for

    if k:
        x_q, x_scale = quantize_fp8_rowwise(torch.randn(m, k) * 2)
        w_q, w_scale = quantize_fp8_rowwise(torch.randn(n, k) / k**0.5)
    else:  # no input channels: nothing to quantize, and every output is an empty sum
        x_q, x_scale = torch.empty(m, 0, dtype=torch.float8_e4m3fn), torch.ones(m)
        w_q, w_scale = torch.empty(n, 0, dtype=torch.float8_e4m3fn), torch.ones(n)
    exact = (x_q.double() @ w_q.double().t()) * x_scale.double()[:, None] * w_scale.double()[None, :]
    splits = split_k_for(n, k, sms=132, programs_per_sm=DEFAULT.splitk_programs_per_sm)  # what a CPU tensor gets
    return fp8_rowwise_mm_splitk(x_q, w_q, x_scale, w_scale), exact, {"splits": splits}


def blockwise(m: int, n: int, k: int, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from fxquant.kernels.fp8_blockwise_gemm import fp8_blockwise_gemm

    x_q, x_scale = quantize_fp8_groupwise(torch.randn(m, k) * 2, block_k)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(n, k) / k**0.5, (block_n, block_k))
    w_scale_rows = w_scale.double().repeat_interleave(block_n, dim=0)  # [N, K / block_k]
    exact = torch.zeros(m, n, dtype=torch.float64)
    for kb, start in enumerate(range(0, k, block_k)):
        block = x_q[:, start:start + block_k].double() @ w_q[:, start:start + block_k].double().t()
        exact += block * x_scale.double()[:, kb, None] * w_scale_rows[None, :, kb]
    return fp8_blockwise_gemm(x_q, x_scale, w_q, w_scale, block_n, block_k), exact, {}


def grouped(s: int, n: int, k: int, counts: list[int], config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The grouped GEMM on `counts` rows per expert (their sum may be below s: the rows past it are not
    compared, as the kernel leaves them unwritten), with its default tiles or `config`'s."""
    from fxquant.kernels.fp8_rowwise_grouped_gemm import fp8_rowwise_grouped_gemm_triton

    x_q, x_scale = quantize_fp8_rowwise(torch.randn(s, k) * 2)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(len(counts), n, k) / k**0.5)
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    exact = torch.zeros(s, n, dtype=torch.float64)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        rows = slice(start, end)
        exact[rows] = (x_q[rows].double() @ w_q[expert].double().t()) * x_scale[rows].double()[:, None] * w_scale[expert].double()
        start = end
    out = fp8_rowwise_grouped_gemm_triton(x_q, w_q, x_scale, w_scale, offsets, config)
    return out[:start], exact[:start], {"full_shape": list(out.shape)}


def blockwise_grouped(s: int, n: int, k: int, block_n: int, block_k: int, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The blockwise grouped GEMM on `counts` rows per expert (rows past their sum are not compared)."""
    from fxquant.kernels.fp8_blockwise_grouped_gemm import fp8_blockwise_grouped_gemm

    x_q, x_scale = quantize_fp8_groupwise(torch.randn(s, k) * 2, block_k)
    quantized = [quantize_fp8_blockwise_weight(torch.randn(n, k) / k**0.5, (block_n, block_k)) for _ in counts]
    w_q, w_scale = torch.stack([q for q, _ in quantized]), torch.stack([scale for _, scale in quantized])
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    exact = torch.zeros(s, n, dtype=torch.float64)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        w_scale_rows = w_scale[expert].double().repeat_interleave(block_n, dim=0)  # [N, K / block_k]
        for kb, first in enumerate(range(0, k, block_k)):
            cols = slice(first, first + block_k)
            block = x_q[start:end, cols].double() @ w_q[expert, :, cols].double().t()
            exact[start:end] += block * x_scale.double()[start:end, kb, None] * w_scale_rows[None, :, kb]
        start = end
    out = fp8_blockwise_grouped_gemm(x_q, x_scale, w_q, w_scale, offsets)
    return out[:start], exact[:start], {"full_shape": list(out.shape)}


def int8_split_k(m: int, n: int, k: int, out_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The int8 split-K kernel against the float64 formula, and whether it equals fxquant's reference
    bit for bit (the int32 sums are exact; the scales are applied in the same order), its output in
    `out_dtype`."""
    from fxquant.kernels.int8_rowwise_splitk import int8_rowwise_mm_splitk
    from fxquant.kernels.fp8_rowwise_splitk import split_k_for
    from fxquant.ops.int8 import quantize_int8_rowwise, scaled_int_mm

    x_q, x_scale = quantize_int8_rowwise(torch.randn(m, k) * 2) if k else (torch.empty(m, 0, dtype=torch.int8), torch.ones(m))
    w_q, w_scale = quantize_int8_rowwise(torch.randn(n, k) / max(k, 1)**0.5) if k else (torch.empty(n, 0, dtype=torch.int8), torch.ones(n))
    exact = (x_q.double() @ w_q.double().t()) * x_scale.double()[:, None] * w_scale.double()[None, :]
    dtype = getattr(torch, out_dtype)
    out = int8_rowwise_mm_splitk(x_q, w_q, x_scale, w_scale, dtype)
    splits = split_k_for(n, k, sms=132, programs_per_sm=DEFAULT.splitk_programs_per_sm)
    return out, exact, {"splits": splits, "reference_bits": bool(torch.equal(out, scaled_int_mm(x_q, w_q, x_scale, w_scale, dtype)))}


def int8_tiled(m: int, n: int, k: int, out_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The int8 kernel unsplit with the template's tile for M (the run-time pick above 16 rows) against
    the float64 formula, and whether it equals fxquant's reference bit for bit, its output in `out_dtype`."""
    from fxquant.inductor.tuning import DEFAULT
    from fxquant.kernels.int8_rowwise_splitk import int8_rowwise_mm_tiled
    from fxquant.ops.int8 import quantize_int8_rowwise, scaled_int_mm

    x_q, x_scale = quantize_int8_rowwise(torch.randn(m, k) * 2) if k else (torch.empty(m, 0, dtype=torch.int8), torch.ones(m))
    w_q, w_scale = quantize_int8_rowwise(torch.randn(n, k) / max(k, 1)**0.5) if k else (torch.empty(n, 0, dtype=torch.int8), torch.ones(n))
    exact = (x_q.double() @ w_q.double().t()) * x_scale.double()[:, None] * w_scale.double()[None, :]
    dtype = getattr(torch, out_dtype)
    out = int8_rowwise_mm_tiled(x_q, w_q, x_scale, w_scale, dtype)
    tile = DEFAULT.heuristic_config(max(m, 1), n, k)  # what a CPU tensor gets
    return out, exact, {"tile": [tile.block_m, tile.block_n, tile.block_k],
                        "reference_bits": bool(torch.equal(out, scaled_int_mm(x_q, w_q, x_scale, w_scale, dtype)))}


def report(out: torch.Tensor, exact: torch.Tensor, extra: dict) -> dict:
    """Shape, dtype and whether every output is within one bf16 ulp of exact (plus a floor of 2^-20
    of the largest output, for sums that cancel)."""
    error = (out.double() - exact).abs()
    floor = exact.abs().max().item() * 2.0**-20 if exact.numel() else 0.0
    worst = (error / exact.abs().clamp_min(1e-30)).max().item() if exact.numel() else 0.0
    within = bool((error <= exact.abs() * BF16_ULP + floor).all())
    return {"shape": list(out.shape), "dtype": str(out.dtype), "within": within, "worst": worst, **extra}


if __name__ == "__main__":
    kernel = {"split_k": split_k, "blockwise": blockwise, "grouped": grouped, "blockwise_grouped": blockwise_grouped,
              "int8_split_k": int8_split_k, "int8_tiled": int8_tiled}[sys.argv[1]]
    results = []
    for case in json.loads(sys.argv[2]):
        torch.manual_seed(0)
        results.append(report(*kernel(**case)))
    print(json.dumps(results))
