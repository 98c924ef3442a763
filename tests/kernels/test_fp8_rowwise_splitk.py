"""fxquant's split-K FP8 rowwise GEMM for decode (fxquant/kernels/fp8_rowwise_splitk.py) on the GPU:
the lowering's forced `splitk` choice against the op's reference (about one bf16 ulp apart, as in
test_cuda_fp8_rowwise_gemm.py). Its numerics on the CPU: test_interpreted_triton_kernels.py.
"""

import pytest
import torch

from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from tests.inductor.test_decompositions import GEMM_IN_CODE
from tests.kernels.test_cuda_fp8_rowwise_gemm import compiled_gemm, operands
from tests.models import relative_error


pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("n,k", [(512, 256), (208, 272), (1024, 4096), (4096, 14336)])
def test_forced_split_k_matches_the_reference_on_cuda(monkeypatch, m, n, k):
    monkeypatch.setenv("FXQUANT_GEMM", "splitk")
    out, expected, code = compiled_gemm(operands(m, n, k), {"force_disable_caches": True})
    assert GEMM_IN_CODE["splitk"] in code, code
    assert relative_error(out, expected) < 4e-3, f"M={m} N={n} K={k}"


def test_split_k_gemm_rejects_more_than_sixteen_rows():
    from fxquant.kernels.fp8_rowwise_splitk import fp8_rowwise_mm_splitk

    x_q, x_scale = quantize_fp8_rowwise(torch.randn(17, 256, device="cuda"))
    with pytest.raises(ValueError, match="up to 16 rows, got M=17"):
        fp8_rowwise_mm_splitk(x_q, x_q[:8], x_scale, x_scale[:8])
