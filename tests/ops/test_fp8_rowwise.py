"""FP8 rowwise ops (fxquant/ops/fp8_rowwise.py): quantizer semantics, GEMM numerics, opcheck."""

import pytest
import torch

from fxquant.ops.fp8_common import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

fp8_linear = torch.ops.fxquant.fp8_rowwise_linear
quantize = torch.ops.fxquant.quantize_fp8_per_row

# opcheck's test_schema re-runs the op under a mode that needs fp8 arithmetic, which CPU torch
# lacks ("mul_cpu_reduced_float" not implemented); the other sub-checks run.
OPCHECK_TESTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_quantizer_follows_fbgemm_semantics():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0], [1e-9, 0.0, 0.0, 0.0]])
    x_q, scale = quantize(x)
    assert x_q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (3,)
    assert scale[0].item() == pytest.approx(4.0 / FP8_MAX)
    assert scale[1].item() == pytest.approx(FP8_MIN_SCALE), "an all-zero row gets FBGEMM's minimum scale"
    assert scale[2].item() == pytest.approx(FP8_MIN_SCALE), "a tiny row is guarded by the minimum scale"
    assert x_q[0].float().tolist() == [112.0, -224.0, 56.0, 448.0]
    assert torch.all(x_q[1].float() == 0)


def test_scale_ub_clamps_amax_and_saturates_outliers():
    x = torch.tensor([[1.0, 2000.0, -3000.0, 0.5]])
    x_q, scale = quantize(x, 1200.0)
    assert scale.item() == pytest.approx(1200.0 / FP8_MAX)
    assert x_q.float()[0, 1].item() == FP8_MAX and x_q.float()[0, 2].item() == -FP8_MAX


def test_quantize_keeps_leading_dims():
    x_q, scale = quantize(torch.randn(2, 3, 32, dtype=torch.bfloat16))
    assert x_q.shape == (2, 3, 32) and scale.shape == (2, 3)


def test_quantizer_error_is_within_e4m3_rounding():
    x = torch.randn(64, 256, dtype=torch.float64)
    x_q, scale = quantize_fp8_rowwise(x)
    dequantized = x_q.double() * scale.double().unsqueeze(-1)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values.
    assert torch.all((dequantized - x).abs() <= x.abs() * 2**-4 + scale.double().unsqueeze(-1) * 2**-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_float64_reference_of_the_quantized_math(dtype, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 64, dtype=dtype), torch.randn(48, 64)
    bias = torch.randn(48, dtype=dtype) if with_bias else None
    w_q, w_scale = quantize_fp8_rowwise(w)
    y = fp8_linear(x, w_q, w_scale, bias, None)
    assert y.dtype == dtype and y.shape == (3, 5, 48)

    x_q, x_scale = quantize_fp8_rowwise(x.reshape(-1, 64))
    exact = (x_q.double() * x_scale.double()[:, None]) @ (w_q.double() * w_scale.double()[:, None]).t()
    if bias is not None:
        exact = exact + bias.double()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(y.double().reshape(-1, 48), exact, rtol=tolerance, atol=tolerance)

    full_precision = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    error = ((y.double() - full_precision).norm() / full_precision.norm()).item()
    assert 0 < error < 0.06, f"FP8 rowwise error against the float64 product: {error:.4f}"


def test_linear_rejects_mismatched_shapes():
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="activation has K=48 but the weight is"):
        fp8_linear(torch.randn(2, 48), w_q, w_scale, None, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        fp8_linear(torch.randn(2, 64), w_q, w_scale, torch.randn(16), None)


def test_linear_on_zero_tokens():
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(32, 64))
    assert fp8_linear(torch.randn(0, 64), w_q, w_scale, None, None).shape == (0, 32)


def test_opcheck():
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(32, 64))
    samples = [
        (torch.randn(4, 64), w_q, w_scale, torch.randn(32), None),
        (torch.randn(2, 3, 64, dtype=torch.bfloat16), w_q, w_scale, None, 100.0),
    ]
    for args in samples:
        torch.library.opcheck(fp8_linear, args, test_utils=OPCHECK_TESTS)
    # With an input requiring grad, aot_dispatch would run the backward: the inference-only error, by design.
    requires_grad = (torch.randn(4, 64, requires_grad=True), w_q, w_scale, None, None)
    torch.library.opcheck(fp8_linear, requires_grad, test_utils=OPCHECK_TESTS[:2])
    torch.library.opcheck(quantize, (torch.randn(4, 64), 10.0), test_utils=OPCHECK_TESTS)


def test_backward_is_a_clear_error():
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(32, 64))
    x = torch.randn(4, 64, requires_grad=True)
    y = fp8_linear(x, w_q, w_scale, None, None)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


def test_rowwise_mm_is_the_scaled_product_of_its_operands():
    """fxquant::fp8_rowwise_mm (the GEMM the Inductor lowering chooses kernels for) vs float64."""
    torch.manual_seed(0)
    x_q, x_scale = quantize_fp8_rowwise(torch.randn(5, 96) * 3)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(40, 96))
    out = torch.ops.fxquant.fp8_rowwise_mm(x_q, w_q, x_scale, w_scale)
    expected = (x_q.double() @ w_q.double().t()) * x_scale.double()[:, None] * w_scale.double()[None, :]
    assert out.dtype == torch.bfloat16 and out.shape == (5, 40)
    # float32 accumulation of exact e4m3 products, then one bf16 rounding: within 2^-8 relative.
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()
    torch.library.opcheck(torch.ops.fxquant.fp8_rowwise_mm, (x_q, w_q, x_scale, w_scale), test_utils=OPCHECK_TESTS)
