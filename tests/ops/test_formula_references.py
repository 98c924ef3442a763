"""Every scheme's quantizer and linear op against README's formulas computed independently in float64
(tests/ops/formula_reference.py): codes byte for byte, scales exactly, outputs within the float32
accumulation's bound. Edge cases: all-zero and negative-zero rows, a binding scale_ub, quotients at
and beyond the ±448 saturation, e4m3 subnormals and rounding ties, float32 subnormal inputs.
"""

import pytest
import torch

from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight
from fxquant.ops.fp8_common import saturate_to_fp8
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from fxquant.ops.int8 import quantize_int8_rowwise
from tests.ops import formula_reference as reference

SCALE_UBS = [None, 448.0, 1200.0, 0.5]  # 448 makes row 3's scale exactly 1, 0.5 binds on most rows
DTYPES = [torch.float32, torch.bfloat16]


def edge_rows() -> torch.Tensor:
    """[9, 32] float32 rows whose quotients hit the corners of e4m3 (row 0 and, with ub 448, row 3 have scale 1)."""
    exact = [448.0, -448.0, 0.0, -0.0, 2**-9, 2**-10, 3 * 2**-10, -(2**-11), 1.0625, 1.1875, 440.0, 432.0, 424.0,
             0.017578125, 0.0146484375, -1e-30, 1e-40, 464.0 - 2**-6, 2.5 * 2**-9, -7 * 2**-9]
    row0 = exact + [0.0] * (32 - len(exact))
    saturating = [3000.0, 460.0, 470.0, -1000.0, 447.0, 1.0, -2**-10] + [0.5] * 25
    tiny = [1e-38, -1e-39, 1e-45, -2e-38] * 8  # float32 normal minimum and subnormals: the min-scale guard
    gaussian = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 10
    rows = torch.tensor([row0, [0.0] * 32, [-0.0] * 32, saturating, tiny, quotients_at_ties()])
    return torch.cat([rows, gaussian])


def quotients_at_ties() -> list[float]:
    """A row with amax 553.056 whose other values divide by its scale to e4m3 rounding ties, or one
    float32 step off them: where an approximate division (x times 1 / scale) rounds the other way."""
    amax = 553.056
    scale = reference.fp8_scale(torch.tensor(amax, dtype=torch.float32).double(), None)
    ties = torch.tensor([1.0625, 1.1875, 3.5 * 2**-9, 2.5 * 2**-9, 9.5 * 2**-6, 13.5 * 2**-3, 6.75, 208.0, 0.0146484375])
    at = (ties.double() * scale).float()
    values = torch.cat([at, torch.nextafter(at, torch.full_like(at, 1e9)), torch.nextafter(at, torch.zeros_like(at))])
    return [amax, *values.tolist(), 0.0, 0.0, 0.0, 0.0]


def inputs(dtype):
    x = edge_rows().to(dtype)
    return x, x.double()


def assert_codes(ours: torch.Tensor, expected_codes: torch.Tensor):
    got = ours.view(torch.uint8)
    wrong = (got != expected_codes).nonzero().tolist()
    assert not wrong, f"{len(wrong)} codes differ from the formula, first at {wrong[:5]}"


@pytest.mark.parametrize("scale_ub", SCALE_UBS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rowwise_quantizer_is_the_formula(dtype, scale_ub):
    x, x64 = inputs(dtype)
    codes, _, scale = reference.quantize_fp8(x64, (-1,), scale_ub)
    ours_q, ours_scale = torch.ops.fxquant.quantize_fp8_per_row(x, scale_ub)
    assert_codes(ours_q, codes)
    assert torch.equal(ours_scale.double(), scale.squeeze(-1))


@pytest.mark.parametrize("scale_ub", SCALE_UBS, ids=str)
@pytest.mark.parametrize("group", [8, 32])
def test_group_quantizer_is_the_formula(group, scale_ub):
    x, x64 = inputs(torch.bfloat16)
    codes, _, scale = reference.quantize_fp8(x64.unflatten(-1, (-1, group)), (-1,), scale_ub)
    ours_q, ours_scale = torch.ops.fxquant.quantize_fp8_per_group(x, group, scale_ub)
    assert_codes(ours_q, codes.flatten(-2))
    assert torch.equal(ours_scale.double(), scale.squeeze(-1))


@pytest.mark.parametrize("scale_ub", SCALE_UBS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensorwise_quantizer_is_the_formula(dtype, scale_ub):
    x, x64 = inputs(dtype)
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4), slice(4, 5), slice(5, 6), slice(None)):  # each kind alone, then all
        codes, _, scale = reference.quantize_fp8(x64[rows], (0, 1), scale_ub)
        ours_q, ours_scale = quantize_fp8_tensorwise(x[rows], scale_ub)
        assert_codes(ours_q, codes)
        assert ours_scale.double().item() == scale.item()


@pytest.mark.parametrize("scale", [1.0, 2.0**-4, 6.0 / 448, 3.3e-6])
def test_static_cast_is_the_formula(scale):
    scale = float(torch.tensor(scale, dtype=torch.float32))  # a calibrated scale is a float32 value
    x, x64 = inputs(torch.float32)
    codes, _ = reference.quantize_fp8_static(x64, scale)
    assert_codes(saturate_to_fp8(x, scale), codes)


@pytest.mark.parametrize("block", [(3, 32), (3, 8), (1, 16)])  # the 9 edge rows, 32 wide
def test_blockwise_weight_quantizer_is_the_formula(block):
    w, w64 = inputs(torch.float32)
    n, k = w.shape
    blocks = w64.reshape(n // block[0], block[0], k // block[1], block[1])
    codes, _, scale = reference.quantize_fp8(blocks, (1, 3))
    ours_q, ours_scale = quantize_fp8_blockwise_weight(w, block)
    assert_codes(ours_q, codes.reshape(n, k))
    assert torch.equal(ours_scale.double(), scale[:, 0, :, 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_quantizer_is_the_formula(dtype):
    x, x64 = inputs(dtype)
    x = torch.cat([x, torch.tensor([[2.5, -3.5, 0.5, 127.0] * 8], dtype=dtype)])  # quotients that tie (scale 1)
    values, scale = reference.quantize_int8(torch.cat([x64, x[-1:].double()]))
    ours_q, ours_scale = torch.ops.fxquant.quantize_int8_per_row(x)
    assert torch.equal(ours_q.double(), values) and torch.equal(ours_scale.double(), scale.squeeze(-1))


def within_float32_accumulation(y, exact, magnitude, dtype):
    """|y - exact| <= K products' float32 accumulation error + one rounding to the output dtype."""
    k = 64
    bound = k * 2**-24 * magnitude + torch.finfo(dtype).eps * exact.abs() + 1e-30
    worst = ((y.double() - exact).abs() / bound).max().item()
    assert worst <= 1, f"output off the float64 reference by {worst:.2f} of the bound"


def linear_inputs(dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=generator) * 4
    x[0, 0] = 0  # an all-zero token
    x[1, 1, :4] = torch.tensor([900.0, -2000.0, 1e-30, -0.0])  # outliers a bound saturates, tiny values
    w = torch.randn(48, 64, generator=generator) / 8
    bias = torch.randn(48, generator=generator).to(dtype)
    return x.to(dtype), w, bias


SCHEMES = {  # scheme: (weight quantizer, slice of the activation one scale covers)
    "fp8_rowwise": (quantize_fp8_rowwise, (-1,)),
    "fp8_blockwise": (lambda w: quantize_fp8_blockwise_weight(w, (16, 32)), (-1,)),  # groups of 32: unflattened below
    "fp8_tensorwise": (quantize_fp8_tensorwise, (0, 1)),
}


@pytest.mark.parametrize("scale_ub", [None, 100.0], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fp8_linears_equal_the_formula_in_float64(scheme, dtype, scale_ub):
    """y = dequantized x @ dequantized w.T + bias, both dequantized from the formula's codes."""
    x, w, bias = linear_inputs(dtype)
    quantize_weight, dims = SCHEMES[scheme]
    w_q, w_scale = quantize_weight(w)
    rows = x.reshape(-1, 64).double()
    if scheme == "fp8_blockwise":
        _, values, scale = reference.quantize_fp8(rows.unflatten(-1, (-1, 32)), dims, scale_ub)
        x_dequantized = (values * scale).flatten(-2)
        w_dequantized = w_q.double() * w_scale.double().repeat_interleave(16, 0).repeat_interleave(32, 1)
    else:
        _, values, scale = reference.quantize_fp8(rows, dims, scale_ub)
        x_dequantized = values * scale
        w_dequantized = w_q.double() * (w_scale.double()[:, None] if w_scale.dim() else w_scale.double())
    exact = x_dequantized @ w_dequantized.t() + bias.double()
    y = getattr(torch.ops.fxquant, f"{scheme}_linear")(x, w_q, w_scale, bias, scale_ub)
    assert y.dtype == dtype and y.shape == (3, 5, 48)
    within_float32_accumulation(y.reshape(-1, 48), exact, x_dequantized.abs() @ w_dequantized.abs().t(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_static_tensorwise_linear_equals_the_formula_in_float64(dtype):
    x, w, bias = linear_inputs(dtype)
    w_q, w_scale = quantize_fp8_tensorwise(w)
    x_scale = float(torch.tensor(6.0 / 448, dtype=torch.float32))
    _, values = reference.quantize_fp8_static(x.reshape(-1, 64), x_scale)
    output_scale = x_scale * float(w_scale)
    exact = (values @ w_q.double().t()) * output_scale + bias.double()
    y = torch.ops.fxquant.fp8_tensorwise_static_linear(x, w_q, output_scale, bias, x_scale)
    within_float32_accumulation(y.reshape(-1, 48), exact, (values.abs() @ w_q.double().abs().t()) * output_scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_linear_equals_the_formula_in_float64(dtype):
    x, w, bias = linear_inputs(dtype)
    w_q, w_scale = quantize_int8_rowwise(w)
    values, scale = reference.quantize_int8(x.reshape(-1, 64))
    w_dequantized = w_q.double() * w_scale.double()[:, None]
    exact = (values * scale) @ w_dequantized.t() + bias.double()
    y = torch.ops.fxquant.int8_linear(x, w_q, w_scale, bias)
    # int32 accumulation is exact; the epilogue's float32 products and sum round a few times
    bound = (values * scale).abs() @ w_dequantized.abs().t()
    within_float32_accumulation(y.reshape(-1, 48), exact, bound, dtype)
