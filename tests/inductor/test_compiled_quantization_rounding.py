"""The lowering's quantization code, compiled by Inductor with fxquant's settings, against README's
formulas (tests/ops/formula_reference.py) byte for byte, on the CPU (C++ code; on the GPU the same
check runs against FBGEMM in tests/kernels/test_cuda_compiled_quantization.py): rows whose
quotients sit at e4m3 rounding ties catch a division turned into a product with the reciprocal."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fxquant.inductor import division

from fxquant.ops.fp8_blockwise import quantize_fp8_groupwise
from fxquant.ops.fp8_common import saturate_to_fp8
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from tests.inductor.test_decompositions import compile_with_lowering, kernels
from tests.ops import formula_reference as reference
from tests.ops.test_formula_references import assert_codes, edge_rows

STATIC_SCALE = float(torch.tensor(553.056 / 448, dtype=torch.float32))
CASES = {  # name: (fxquant's quantization as the lowering calls it, the formula's codes)
    "rowwise": (lambda x: quantize_fp8_rowwise(x, 1200.0)[0], lambda x: reference.quantize_fp8(x, (-1,), 1200.0)[0]),
    "groupwise": (lambda x: quantize_fp8_groupwise(x, 16)[0],
                  lambda x: reference.quantize_fp8(x.unflatten(-1, (-1, 16)), (-1,))[0].flatten(-2)),
    "tensorwise": (lambda x: quantize_fp8_tensorwise(x[5:6])[0], lambda x: reference.quantize_fp8(x[5:6], (0, 1))[0]),
    "static": (lambda x: saturate_to_fp8(x, STATIC_SCALE), lambda x: reference.quantize_fp8_static(x, STATIC_SCALE)[0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_quantization_is_the_formula(case):
    quantize, formula = CASES[case]
    x = edge_rows()
    assert_codes(compile_with_lowering(quantize)(x), formula(x.double()))


def test_a_torch_without_inductors_div_rn_divides_in_float64(monkeypatch):
    """torch 2.11's Inductor has no `ops.div_rn`: fxquant::div_rn lowers to a float64 quotient rounded to
    float32 there, and the codes are still the formula's."""
    monkeypatch.setattr(division, "HAS_DIV_RN", False)
    torch._dynamo.reset()
    x = edge_rows()
    with torch._inductor.config.patch(fx_graph_cache=False):  # its key does not see the lowering's choice
        codes, (code,) = run_and_get_code(compile_with_lowering(CASES["static"][0]), x)
    assert_codes(codes, CASES["static"][1](x.double()))
    assert "double" in "".join(kernels(code))


def test_a_float64_quotient_rounded_to_float32_is_the_correctly_rounded_float32_quotient():
    """The float64 lowering's premise (double rounding of a quotient is innocuous when 53 ≥ 2·24 + 2),
    checked against the CPU's float32 division on a million random pairs spanning float32's exponents,
    subnormal quotients included."""
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 2**23, (2, 1_000_000), generator=generator, dtype=torch.int64).to(torch.int32)
    a, b = bits.view(torch.float32)  # every finite positive float32 (0x7f800000 and up are inf / NaN)
    assert torch.equal((a.double() / b.double()).float(), a / b)
