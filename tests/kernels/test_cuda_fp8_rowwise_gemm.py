"""fxquant::fp8_rowwise_mm's lowering on CUDA (gpu marker): every GEMM choice, and max-autotune
over all of them, against the CPU reference of the op.

The reference multiplies the e4m3 operands exactly in float32; the kernels accumulate in another
order, then round to bf16, so results differ by about one bf16 ulp (2^-8 relative).
"""

import pytest
import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.utils import run_and_get_code

import fxquant.inductor.fp8_rowwise_mm  # noqa: F401  (registers the lowering)
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from tests.inductor.test_decompositions import GEMM_IN_CODE
from tests.models import relative_error

pytestmark = pytest.mark.gpu
# (N, K): K = 272 is no multiple of any BLOCK_K (the masked main loop), N = 208 none of BLOCK_N.
SHAPES = [(512, 256), (208, 272), (1024, 4096)]


def operands(m, n, k):
    torch.manual_seed(0)
    x_q, x_scale = quantize_fp8_rowwise(torch.randn(m, k, device="cuda") * 2)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(n, k, device="cuda") / k**0.5)
    return x_q, w_q, x_scale, w_scale


def compiled_gemm(args, patches):
    def gemm(x_q, w_q, x_scale, w_scale):
        return torch.ops.fxquant.fp8_rowwise_mm(x_q, w_q, x_scale, w_scale).float() * 2  # an epilogue to fuse

    compiled = torch.compile(gemm, dynamic=False, backend=lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches))
    out, (code, *_) = run_and_get_code(compiled, *args)
    expected = gemm(*(t.cpu() for t in args))
    return out.cpu(), expected, code


@pytest.mark.parametrize("gemm", ["triton", "fbgemm", "scaled_mm", "by_rows"])
@pytest.mark.parametrize("m", [1, 7, 16, 100, 512])
@pytest.mark.parametrize("n,k", SHAPES)
def test_each_gemm_choice_matches_the_reference(monkeypatch, gemm, m, n, k):
    if gemm == "fbgemm" and not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai is not installed")
    monkeypatch.setenv("FXQUANT_GEMM", gemm)
    out, expected, code = compiled_gemm(operands(m, n, k), {"force_disable_caches": True})
    assert GEMM_IN_CODE[gemm] in code, f"the GEMM is not {gemm}:\n{code}"
    error = relative_error(out, expected)
    assert error < 4e-3, f"{gemm} M={m} N={n} K={k}: relative error {error:.2e}"


@pytest.mark.parametrize("m", [1, 16, 512])
def test_max_autotune_picks_among_all_choices(m):
    n, k = 1024, 4096
    out, expected, code = compiled_gemm(operands(m, n, k), {"force_disable_caches": True, "max_autotune_gemm": True})
    picked = [name for name, marker in GEMM_IN_CODE.items() if name != "cpu" and marker in code]
    assert len(picked) == 1, f"want exactly one GEMM in the code, found {picked}"
    assert relative_error(out, expected) < 4e-3


def test_heuristic_uses_fbgemm_for_small_m_and_cublas_above():
    fbgemm = fbgemm_genai_available()
    small = "fbgemm" if fbgemm else "scaled_mm"
    cases = [(1, "fbgemm" if fbgemm else "splitk"), (16, "fbgemm" if fbgemm else "triton"), (17, small), (128, small),
             (129, "scaled_mm")]
    for m, gemm in cases:
        _, _, code = compiled_gemm(operands(m, 1024, 4096), {"force_disable_caches": True})
        assert GEMM_IN_CODE[gemm] in code, f"M={m}: want {gemm}:\n{code}"


def test_dynamic_m_picks_the_library_per_call():
    """A batch size Dynamo saw change compiles once for every M: the GEMM is chosen at run time,
    and each M still matches the reference; no tokens give an empty output."""

    def gemm(x_q, w_q, x_scale, w_scale):
        return torch.ops.fxquant.fp8_rowwise_mm(x_q, w_q, x_scale, w_scale)

    compiled = torch.compile(gemm)
    args = operands(3, 1024, 4096)
    torch._dynamo.mark_dynamic(args[0], 0)
    torch._dynamo.mark_dynamic(args[2], 0)
    _, (code, *_) = run_and_get_code(compiled, *args)
    assert GEMM_IN_CODE["by_rows"] in code, code
    for m in (3, 128, 129, 600):
        args = operands(m, 1024, 4096)
        error = relative_error(compiled(*args).cpu(), gemm(*(t.cpu() for t in args)))
        assert error < 4e-3, f"M={m}: relative error {error:.2e}"
    assert gemm(*operands(0, 1024, 4096)).shape == (0, 1024)
