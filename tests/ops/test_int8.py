"""int8 W8A8 ops (fxquant/ops/int8.py): quantizer, int32-accumulated GEMM numerics, opcheck."""

import pytest
import torch

from fxquant.ops import int8 as int8_ops
from fxquant.ops.int8 import int_mm_by_float_matmuls, quantize_int8_rowwise

int8_linear = torch.ops.fxquant.int8_linear
quantize = torch.ops.fxquant.quantize_int8_per_row


def test_quantizer_is_symmetric_per_row():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]])
    x_q, scale = quantize(x)
    assert x_q.dtype == torch.int8 and scale.shape == (2,)
    assert scale[0].item() == pytest.approx(4.0 / 127)
    assert x_q[0].tolist() == [32, -64, 16, 127]
    assert x_q[1].tolist() == [0, 0, 0, 0] and torch.isfinite(scale[1])


@pytest.mark.parametrize("m, k, n", [(3, 64, 5), (17, 1100, 33), (2, 4096, 3), (1, 14336, 8), (2, 0, 3)])
def test_the_int8_gemm_by_float_matmuls_is_exact(m, k, n):
    """Without VNNI / AMX the CPU runs int8 GEMMs as float32 matmuls over slices of 1024 (sums below 2^24):
    aten._int_mm's bits, against int64 products, at the largest magnitudes too (K * 127^2 > 2^24)."""
    torch.manual_seed(k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    if k:
        a[0], b[:, 0] = 127, -127  # one output at -K * 127^2
    out = int_mm_by_float_matmuls(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), a.long() @ b.long())


def test_a_cpu_without_int8_dot_products_takes_float_matmuls(monkeypatch):
    calls = []
    monkeypatch.setattr(int8_ops, "cpu_int8_slow_reason", lambda: "no VNNI")
    monkeypatch.setattr(int8_ops, "int_mm_by_float_matmuls", lambda a, b: calls.append(a.shape) or torch._int_mm(a, b))
    torch.manual_seed(0)
    w_q, w_scale = quantize_int8_rowwise(torch.randn(48, 64))
    int8_linear(torch.randn(20, 64), w_q, w_scale)
    assert calls == [(20, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_is_exact_int32_accumulation_then_rescale(dtype, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(2, 7, 64, dtype=dtype), torch.randn(48, 64)
    bias = torch.randn(48, dtype=dtype) if with_bias else None
    w_q, w_scale = quantize_int8_rowwise(w)
    y = int8_linear(x, w_q, w_scale, bias)
    assert y.dtype == dtype and y.shape == (2, 7, 48)

    x_q, x_scale = quantize_int8_rowwise(x.reshape(-1, 64))
    integer = x_q.double() @ w_q.double().t()  # exact in float64 for |sum| < 2^53
    exact = integer * x_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        exact = exact + bias.double()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(y.double().reshape(-1, 48), exact, rtol=tolerance, atol=tolerance)

    full_precision = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    error = ((y.double() - full_precision).norm() / full_precision.norm()).item()
    assert 0 < error < 0.02, f"int8 error against the float64 product: {error:.4f}"


def test_opcheck():
    w_q, w_scale = quantize_int8_rowwise(torch.randn(32, 64))
    for args in [
        (torch.randn(4, 64), w_q, w_scale, torch.randn(32)),
        (torch.randn(2, 3, 64, dtype=torch.bfloat16), w_q, w_scale, None),
    ]:
        torch.library.opcheck(int8_linear, args)
    # With an input requiring grad, aot_dispatch would run the backward: the inference-only error, by design.
    requires_grad = (torch.randn(4, 64, requires_grad=True), w_q, w_scale, None)
    torch.library.opcheck(int8_linear, requires_grad, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(quantize, (torch.randn(4, 64),))


def test_backward_is_a_clear_error():
    w_q, w_scale = quantize_int8_rowwise(torch.randn(32, 64))
    x = torch.randn(4, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        int8_linear(x, w_q, w_scale, None).sum().backward()


GEMM_OPS = ["int8_rowwise_mm", "scaled_int_mm", "int8_rowwise_mm_by_rows"]


@pytest.mark.parametrize("name", GEMM_OPS)
def test_the_gemm_ops_are_the_float64_formula_in_float32(name):
    """int8_rowwise_mm and the lowering's extern choices: exact int32 sums, then x_scale, then w_scale."""
    torch.manual_seed(0)
    x_q, x_scale = quantize_int8_rowwise(torch.randn(19, 96))
    w_q, w_scale = quantize_int8_rowwise(torch.randn(40, 96))
    y = getattr(torch.ops.fxquant, name)(x_q, w_q, x_scale, w_scale)
    assert y.dtype == torch.float32 and y.shape == (19, 40)
    exact = (x_q.double() @ w_q.double().t()) * x_scale.double()[:, None] * w_scale.double()[None, :]
    torch.testing.assert_close(y.double(), exact, rtol=2**-22, atol=0)  # two float32 roundings
    torch.library.opcheck(getattr(torch.ops.fxquant, name), (x_q, w_q, x_scale, w_scale))


@pytest.mark.parametrize("name", GEMM_OPS)
def test_the_gemm_ops_round_once_to_the_dtype_asked_for(name):
    """out_dtype (what a layer without bias asks for): the float32 result rounded once to it."""
    torch.manual_seed(0)
    x_q, x_scale = quantize_int8_rowwise(torch.randn(19, 96))
    w_q, w_scale = quantize_int8_rowwise(torch.randn(40, 96))
    y = getattr(torch.ops.fxquant, name)(x_q, w_q, x_scale, w_scale, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (19, 40)
    exact = (x_q.double() @ w_q.double().t()) * x_scale.double()[:, None] * w_scale.double()[None, :]
    torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=0)  # bf16's rounding: half an ulp, 2^-8
    assert torch.equal(y, getattr(torch.ops.fxquant, name)(x_q, w_q, x_scale, w_scale).to(torch.bfloat16))
    torch.library.opcheck(getattr(torch.ops.fxquant, name), (x_q, w_q, x_scale, w_scale, torch.bfloat16))


def test_the_gemm_op_takes_no_rows():
    w_q, w_scale = quantize_int8_rowwise(torch.randn(16, 32))
    y = torch.ops.fxquant.int8_rowwise_mm(torch.empty(0, 32, dtype=torch.int8), w_q, torch.empty(0), w_scale)
    assert y.shape == (0, 16)
