"""fxquant's split-K FP8 rowwise GEMM for decode (fxquant/kernels/fp8_rowwise_splitk.py).

On the CPU it runs under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the variable
is read when the kernel is defined), where the triton package is installed; CI has none and skips
it. The interpreter casts fp32 to bf16 by truncation, the GPU rounds to nearest: either way each
output is within one bf16 ulp (2^-7 relative) of the exact float64 result. On the GPU the kernel
runs as the lowering's forced `splitk` choice against the op's reference.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from tests.kernels.test_cuda_fp8_rowwise_gemm import compiled_gemm, operands
from tests.models import relative_error

BF16_ULP = 2.0**-7
# (M, N, K, slices of K with 132 SMs): tails in N and K, one slice, two, eight
INTERPRETED_CASES = [(1, 512, 4096, 4), (7, 208, 272, 1), (16, 96, 2304, 2), (3, 64, 1000, 1), (2, 64, 8192, 8), (0, 64, 256, 1)]

INTERPRETED = """
import json, sys, torch
from fxquant.kernels.fp8_rowwise_splitk import fp8_rowwise_mm_splitk, split_k_for
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
results = []
for m, n, k, _ in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    x_q, x_scale = quantize_fp8_rowwise(torch.randn(m, k) * 2)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(n, k) / k**0.5)
    exact = (x_q.double() @ w_q.double().t()) * x_scale.double()[:, None] * w_scale.double()[None, :]
    out = fp8_rowwise_mm_splitk(x_q, w_q, x_scale, w_scale)
    worst = ((out.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item() if m else 0.0
    results.append({"shape": list(out.shape), "dtype": str(out.dtype), "splits": split_k_for(n, k, 132), "worst": worst})
print(json.dumps(results))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton package is not installed")
def test_split_k_gemm_interpreted_is_exact_to_a_bf16_ulp():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED, json.dumps(INTERPRETED_CASES)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for (m, n, k, splits), result in zip(INTERPRETED_CASES, json.loads(done.stdout)):
        assert result["shape"] == [m, n] and result["dtype"] == "torch.bfloat16"
        assert result["splits"] == splits, f"M={m} N={n} K={k}"
        assert result["worst"] <= BF16_ULP, f"M={m} N={n} K={k}: {result['worst']:.2e} > one bf16 ulp"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("n,k", [(512, 256), (208, 272), (1024, 4096), (4096, 14336)])
def test_forced_split_k_matches_the_reference_on_cuda(monkeypatch, m, n, k):
    monkeypatch.setenv("FXQUANT_GEMM", "splitk")
    out, expected, code = compiled_gemm(operands(m, n, k), {"force_disable_caches": True})
    assert "fxquant_fp8_rowwise_mm_splitk" in code, code
    assert relative_error(out, expected) < 4e-3, f"M={m} N={n} K={k}"


@pytest.mark.gpu
def test_split_k_gemm_rejects_more_than_sixteen_rows():
    from fxquant.kernels.fp8_rowwise_splitk import fp8_rowwise_mm_splitk

    x_q, x_scale = quantize_fp8_rowwise(torch.randn(17, 256, device="cuda"))
    with pytest.raises(ValueError, match="up to 16 rows, got M=17"):
        fp8_rowwise_mm_splitk(x_q, x_q[:8], x_scale, x_scale[:8])
