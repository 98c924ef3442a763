"""The lowering's quantization code, compiled by Inductor with fxquant's settings, against README's
formulas (tests/ops/formula_reference.py) byte for byte, on the CPU (C++ code; on the GPU the same
check runs against FBGEMM in tests/kernels/test_cuda_compiled_quantization.py): rows whose
quotients sit at e4m3 rounding ties catch a division turned into a product with the reciprocal."""

import pytest
import torch

from fxquant.ops.fp8_blockwise import quantize_fp8_groupwise
from fxquant.ops.fp8_common import saturate_to_fp8
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from tests.inductor.test_decompositions import compile_with_lowering
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
