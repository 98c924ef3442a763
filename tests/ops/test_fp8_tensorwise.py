"""FP8 tensorwise ops (fxquant/ops/fp8_tensorwise.py): the one-scale quantizer (FBGEMM's scale rule
over the whole tensor), the dynamic and the static GEMM against float64 references of the same
quantized math, saturation under a static scale, shape errors, opcheck, the inference-only backward."""

import pytest
import torch

from fxquant.ops.fp8_common import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, fp8_static_scale
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise

dynamic_linear = torch.ops.fxquant.fp8_tensorwise_linear
static_linear = torch.ops.fxquant.fp8_tensorwise_static_linear

# opcheck's test_schema re-runs the op under a mode that needs fp8 arithmetic, which CPU torch
# lacks ("mul_cpu_reduced_float" not implemented); the other sub-checks run.
OPCHECK_TESTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def test_quantizer_follows_fbgemm_semantics_over_the_whole_tensor():
    x = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    x_q, scale = quantize_fp8_tensorwise(x)
    assert x_q.dtype == FP8_DTYPE and x_q.shape == (2, 2), f"x_q: {x_q.dtype} {tuple(x_q.shape)}"
    assert scale.dtype == torch.float32 and scale.shape == (), f"scale: {scale.dtype} {tuple(scale.shape)}"
    assert scale.item() == pytest.approx(4.0 / FP8_MAX)
    assert x_q.float().tolist() == [[112.0, -224.0], [56.0, 448.0]], "one scale for all rows"
    assert quantize_fp8_tensorwise(torch.zeros(3, 4))[1].item() == pytest.approx(FP8_MIN_SCALE), (
        "an all-zero tensor gets FBGEMM's minimum scale"
    )


def test_scale_ub_clamps_amax_and_saturates_outliers():
    x_q, scale = quantize_fp8_tensorwise(torch.tensor([[1.0, 2000.0, -3000.0, 0.5]]), 1200.0)
    assert scale.item() == pytest.approx(1200.0 / FP8_MAX)
    assert x_q.float()[0, 1].item() == FP8_MAX and x_q.float()[0, 2].item() == -FP8_MAX


def test_quantizer_error_is_within_e4m3_rounding():
    x = torch.randn(64, 256, dtype=torch.float64)
    x_q, scale = quantize_fp8_tensorwise(x)
    dequantized = x_q.double() * scale.double()
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values.
    assert torch.all((dequantized - x).abs() <= x.abs() * 2**-4 + scale.double() * 2**-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dynamic_linear_matches_float64_reference_of_the_quantized_math(dtype, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 64, dtype=dtype), torch.randn(48, 64)
    bias = torch.randn(48, dtype=dtype) if with_bias else None
    w_q, w_scale = quantize_fp8_tensorwise(w)
    y = dynamic_linear(x, w_q, w_scale, bias, None)
    assert y.dtype == dtype and y.shape == (3, 5, 48), f"y: {y.dtype} {tuple(y.shape)}"

    x_q, x_scale = quantize_fp8_tensorwise(x.reshape(-1, 64))
    exact = (x_q.double() * x_scale.double()) @ (w_q.double() * w_scale.double()).t()
    if bias is not None:
        exact = exact + bias.double()
    torch.testing.assert_close(y.double().reshape(-1, 48), exact, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])

    full_precision = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    error = ((y.double() - full_precision).norm() / full_precision.norm()).item()
    assert 0 < error < 0.06, f"FP8 tensorwise error against the float64 product: {error:.4f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_static_linear_uses_the_given_scales(dtype, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 64, dtype=dtype), torch.randn(48, 64)
    bias = torch.randn(48, dtype=dtype) if with_bias else None
    w_q, w_scale = quantize_fp8_tensorwise(w)
    x_scale = fp8_static_scale(3.0)  # a calibrated amax below this batch's: its largest values saturate
    output_scale = x_scale * w_scale.item()
    y = static_linear(x, w_q, output_scale, bias, x_scale)
    assert y.dtype == dtype and y.shape == (3, 5, 48), f"y: {y.dtype} {tuple(y.shape)}"

    x_q = (x.double().reshape(-1, 64) / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    exact = (x_q.double() @ w_q.double().t()) * output_scale
    if bias is not None:
        exact = exact + bias.double()
    torch.testing.assert_close(y.double().reshape(-1, 48), exact, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])

    full_precision = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    error = ((y.double() - full_precision).norm() / full_precision.norm()).item()
    assert 0 < error < 0.06, f"FP8 tensorwise static error against the float64 product: {error:.4f}"


def test_static_linear_saturates_activations_beyond_448_scales():
    torch.manual_seed(0)
    w_q, w_scale = quantize_fp8_tensorwise(torch.randn(32, 64))
    x_scale = fp8_static_scale(2.0)
    output_scale = x_scale * w_scale.item()
    signs = torch.randn(4, 64).sign()
    beyond = signs * FP8_MAX * x_scale * torch.linspace(1.5, 100.0, 64)  # every value past the e4m3 range
    y = static_linear(beyond, w_q, output_scale, None, x_scale)
    saturated = (signs.double() * FP8_MAX) @ w_q.double().t() * output_scale
    torch.testing.assert_close(y.double(), saturated, rtol=1e-5, atol=1e-5, msg="values beyond 448 * x_scale must saturate to ±448")


def test_linears_reject_mismatched_shapes():
    w_q, w_scale = quantize_fp8_tensorwise(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="activation has K=48 but the weight is"):
        dynamic_linear(torch.randn(2, 48), w_q, w_scale, None, None)
    with pytest.raises(RuntimeError, match=r"weight scale must be float32 \[\]"):
        dynamic_linear(torch.randn(2, 64), w_q, w_scale.view(1), None, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        dynamic_linear(torch.randn(2, 64), w_q, w_scale, torch.randn(16), None)
    with pytest.raises(RuntimeError, match="activation has K=48 but the weight is"):
        static_linear(torch.randn(2, 48), w_q, 1e-4, None, 0.01)
    with pytest.raises(RuntimeError, match="bias must be"):
        static_linear(torch.randn(2, 64), w_q, 1e-4, torch.randn(16), 0.01)


def test_static_linear_on_zero_tokens():
    w_q, _ = quantize_fp8_tensorwise(torch.randn(32, 64))
    assert static_linear(torch.randn(0, 64), w_q, 1e-4, None, 0.01).shape == (0, 32)


def test_dynamic_linear_on_zero_tokens():
    w_q, w_scale = quantize_fp8_tensorwise(torch.randn(32, 64))
    assert dynamic_linear(torch.randn(0, 64), w_q, w_scale, None, None).shape == (0, 32)


def test_opcheck():
    w_q, w_scale = quantize_fp8_tensorwise(torch.randn(32, 64))
    for args in [
        (torch.randn(4, 64), w_q, w_scale, torch.randn(32), None),
        (torch.randn(2, 3, 64, dtype=torch.bfloat16), w_q, w_scale, None, 100.0),
    ]:
        torch.library.opcheck(dynamic_linear, args, test_utils=OPCHECK_TESTS)
    for args in [
        (torch.randn(4, 64), w_q, 1e-4, torch.randn(32), 0.01),
        (torch.randn(2, 3, 64, dtype=torch.bfloat16), w_q, 1e-4, None, 0.01),
    ]:
        torch.library.opcheck(static_linear, args, test_utils=OPCHECK_TESTS)
    # With an input requiring grad, aot_dispatch would run the backward: the inference-only error, by design.
    torch.library.opcheck(dynamic_linear, (torch.randn(4, 64, requires_grad=True), w_q, w_scale, None, None), test_utils=OPCHECK_TESTS[:2])
    torch.library.opcheck(static_linear, (torch.randn(4, 64, requires_grad=True), w_q, 1e-4, None, 0.01), test_utils=OPCHECK_TESTS[:2])


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_backward_is_a_clear_error(static):
    w_q, w_scale = quantize_fp8_tensorwise(torch.randn(32, 64))
    x = torch.randn(4, 64, requires_grad=True)
    y = static_linear(x, w_q, 1e-4, None, 0.01) if static else dynamic_linear(x, w_q, w_scale, None, None)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()
