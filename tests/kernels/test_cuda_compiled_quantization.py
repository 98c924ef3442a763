"""The FP8 activation quantization as users run it on the GPU, Inductor's code from fxquant's
lowering with fxquant's Inductor settings, against FBGEMM's quantizer and GEMM bit for bit, and
for every FP8 scheme against the eager op and the CPU reference (gpu marker).

Inputs that make a wrong rounding show: 4 shapes up to 1000 x 14336, 4 kinds of rows (Gaussian,
all-zero rows, rows scaled by 3e3, magnitudes from 1e-40 to 1, bf16 subnormals included), 3 scale
bounds (none, 1200, 8: the last two bind on the scaled rows). One compile per shape and bound.
"""

import pytest
import torch

from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_blockwise import quantize_fp8_groupwise
from fxquant.ops.fp8_common import saturate_to_fp8
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from tests.inductor.test_decompositions import compile_with_lowering

pytestmark = pytest.mark.gpu
SHAPES = [(1, 4096), (16, 14336), (333, 1024), (1000, 14336)]
KINDS = ["gaussian", "zero_rows", "scaled_rows", "tiny"]
SCALE_UBS = [None, 1200.0, 8.0]


def activation(kind: str, shape: tuple[int, int]) -> torch.Tensor:
    """A bf16 CUDA activation of one kind (above)."""
    generator = torch.Generator(device="cuda").manual_seed(len(kind) * 1000 + shape[0])
    x = torch.randn(shape, device="cuda", generator=generator)
    if kind == "zero_rows":
        x[::3] = 0
    elif kind == "scaled_rows":
        x[::5] *= 3e3
    elif kind == "tiny":
        x *= 10 ** (-40 * torch.rand(shape, device="cuda", generator=generator))
    return x.to(torch.bfloat16)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def differing(ours: torch.Tensor, theirs: torch.Tensor) -> int:
    return int((bits(ours) != bits(theirs)).sum())


def fbgemm_ub(scale_ub: float | None) -> torch.Tensor | None:
    return None if scale_ub is None else torch.tensor([scale_ub], device="cuda")


def needs_fbgemm() -> None:
    if not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai not installed")


@pytest.mark.parametrize("scale_ub", SCALE_UBS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_rowwise_quantization_is_fbgemms_bit_for_bit(shape, scale_ub):
    needs_fbgemm()
    quantize = compile_with_lowering(lambda x: quantize_fp8_rowwise(x, scale_ub))
    failures = []
    for kind in KINDS:
        x = activation(kind, shape)
        theirs_q, theirs_scale = torch.ops.fbgemm.quantize_fp8_per_row(x, None, fbgemm_ub(scale_ub))
        ours_q, ours_scale = quantize(x)
        codes = differing(ours_q, theirs_q)
        if codes or not torch.equal(ours_scale, theirs_scale.view(ours_scale.shape)):
            failures.append(f"{kind}: {codes} of {x.numel()} codes differ, scales equal: "
                            f"{torch.equal(ours_scale, theirs_scale.view(ours_scale.shape))}")
    assert not failures, failures


@pytest.mark.parametrize("scale_ub", SCALE_UBS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_rowwise_linear_with_fbgemms_gemm_is_fbgemms(monkeypatch, shape, scale_ub):
    """FXQUANT_GEMM=fbgemm: the compiled linear (fused quantization, FBGEMM's GEMM) equals FBGEMM's
    own quantize_fp8_per_row + f8f8bf16_rowwise."""
    needs_fbgemm()
    monkeypatch.setenv("FXQUANT_GEMM", "fbgemm")
    k = shape[1]
    w = torch.randn(512, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(k)) / k**0.5
    w_q, w_scale = quantize_fp8_rowwise(w)
    with torch._inductor.config.patch(force_disable_caches=True):  # the GEMM choice is not in Inductor's key
        linear = compile_with_lowering(lambda x: torch.ops.fxquant.fp8_rowwise_linear(x, w_q, w_scale, None, scale_ub))
        failures = []
        for kind in KINDS:
            x = activation(kind, shape)
            x_q, x_scale = torch.ops.fbgemm.quantize_fp8_per_row(x, None, fbgemm_ub(scale_ub))
            theirs = torch.ops.fbgemm.f8f8bf16_rowwise(x_q, w_q, x_scale, w_scale, use_fast_accum=True)
            ours = linear(x)
            if not torch.equal(ours, theirs):
                failures.append(f"{kind}: {int((ours != theirs).sum())} of {ours.numel()} outputs differ")
    assert not failures, failures


def groupwise(x, scale_ub):
    return quantize_fp8_groupwise(x, 128, scale_ub)


def tensorwise(x, scale_ub):
    return quantize_fp8_tensorwise(x, scale_ub)


def static_tensorwise(x, scale_ub):
    """The static scheme's cast by a folded Python-float scale (amax 6, or the bound when lower)."""
    return saturate_to_fp8(x, min(6.0, scale_ub or 6.0) / 448), None


@pytest.mark.parametrize("scale_ub", SCALE_UBS, ids=str)
@pytest.mark.parametrize("quantizer", [quantize_fp8_rowwise, groupwise, tensorwise, static_tensorwise],
                         ids=["rowwise", "blockwise", "tensorwise", "static_tensorwise"])
def test_compiled_quantizers_equal_eager_and_cpu_reference(quantizer, scale_ub):
    """Every scheme's fused quantization (the lowering's code) against the same function run eagerly
    on CUDA and on the CPU: codes and scales bit for bit."""
    compiled = compile_with_lowering(lambda x: quantizer(x, scale_ub))
    failures = []
    for kind in KINDS:
        x = activation(kind, (333, 4096))
        for name, (q, scale) in {"eager CUDA": quantizer(x, scale_ub), "CPU": quantizer(x.cpu(), scale_ub)}.items():
            ours_q, ours_scale = compiled(x)
            codes = differing(ours_q.cpu(), q.cpu())
            scales_equal = scale is None or torch.equal(ours_scale.cpu(), scale.cpu())
            if codes or not scales_equal:
                failures.append(f"{kind} vs {name}: {codes} codes differ, scales equal: {scales_equal}")
    assert not failures, failures
