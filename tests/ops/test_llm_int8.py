"""LLM.int8 op (fxquant/ops/llm_int8.py): the weight's int8 codes and absmax bit-identical to
bitsandbytes'; the op against a float64 reference of its formula, against bitsandbytes'
Linear8bitLt in inference (threshold 6 and 0) and, at threshold 0, against fxquant's int8 op."""

import pytest
import torch

from fxquant.ops.int8 import quantize_int8_rowwise
from fxquant.ops.llm_int8 import quantize_llm_int8_weight

bnb = pytest.importorskip("bitsandbytes")
llm_int8_linear = torch.ops.fxquant.llm_int8_linear


def activations_with_outliers(rows, k, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(rows, k)
    x[0, 5] = 9.0  # one outlier in column 5
    x[:, 17] *= 8  # a whole outlier feature
    return x


def test_weight_is_bitsandbytes_int8_vectorwise_quant():
    weight = torch.randn(48, 128) * 0.05
    weight[3] = 0
    expected_q, expected_absmax, _ = bnb.functional.int8_vectorwise_quant(weight.half())
    w_q, absmax = quantize_llm_int8_weight(weight)
    assert torch.equal(w_q[torch.arange(48) != 3], expected_q[torch.arange(48) != 3])
    assert torch.equal(w_q[3], torch.zeros(128, dtype=torch.int8))  # bnb divides 0 by 0 here
    assert torch.equal(absmax, expected_absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_is_its_formula(dtype):
    k, n, threshold = 128, 40, 6.0
    x = activations_with_outliers(6, k).to(dtype)
    w_q, w_absmax = quantize_llm_int8_weight(torch.randn(n, k) * 0.05)
    bias = torch.randn(n).to(dtype)
    y = llm_int8_linear(x, w_q, w_absmax, bias, threshold)

    xd = x.double()
    outlier = xd.abs() >= threshold
    columns = outlier.any(0)
    assert columns.nonzero().flatten().tolist() == [5, 17]
    rowmax = xd.masked_fill(outlier, 0).abs().amax(1)
    x_q = torch.round(xd.masked_fill(outlier, 0) * 127 / rowmax[:, None]).masked_fill(columns, 0)
    inlier_part = (x_q @ w_q.double().t()) * rowmax[:, None] * w_absmax.double()[None, :] / 127**2
    outlier_part = xd[:, columns] @ (w_q.double() * w_absmax.double()[:, None] / 127)[:, columns].t()
    exact = inlier_part + outlier_part + bias.double()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), exact, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_matches_bitsandbytes_linear8bitlt(threshold):
    k, n = 256, 64
    linear = torch.nn.Linear(k, n)
    torch.nn.init.normal_(linear.weight, std=0.05)
    module = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False, threshold=threshold)
    module.load_state_dict(linear.state_dict())
    module = module.to("cpu").eval()
    x = activations_with_outliers(8, k, seed=2)
    with torch.no_grad():
        expected = module(x.half()).float()
    assert torch.equal(module.weight.data, quantize_llm_int8_weight(linear.weight.detach())[0])
    w_q, w_absmax = quantize_llm_int8_weight(linear.weight.detach())
    ours = llm_int8_linear(x.half(), w_q, w_absmax, linear.bias.detach().half(), threshold).float()
    # Both in float16 out; bnb quantizes x from float16, we from float32 (x is float16 here, so the
    # same values): the int8 codes agree, and the outputs to float16 rounding of the sums.
    scale = expected.abs().max().item()
    worst = (ours - expected).abs().max().item() / scale
    assert worst < 2e-3, f"{worst:.2e} of the largest output"
    exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    error = ((ours.double() - exact).norm() / exact.norm()).item()
    assert error < (0.01 if threshold else 0.2), f"error against the float product: {error:.4f}"


def test_threshold_zero_is_plain_int8():
    k, n = 128, 32
    torch.manual_seed(3)
    x, weight = torch.randn(5, k), torch.randn(n, k) * 0.05
    w_q, w_absmax = quantize_llm_int8_weight(weight)
    ours = llm_int8_linear(x, w_q, w_absmax, None, 0.0)
    int8_q, int8_scale = quantize_int8_rowwise(weight)
    plain = torch.ops.fxquant.int8_linear(x, int8_q, int8_scale, None)
    # the two round W * 127 / absmax the same but for ties and the float16 cast of W here
    assert (w_q != int8_q).float().mean() < 0.02
    torch.testing.assert_close(ours, plain, rtol=0, atol=2e-2 * plain.abs().max().item())


def test_opcheck():
    w_q, w_absmax = quantize_llm_int8_weight(torch.randn(32, 64))
    torch.library.opcheck(llm_int8_linear, (activations_with_outliers(4, 64), w_q, w_absmax, torch.randn(32), 6.0))
    torch.library.opcheck(llm_int8_linear, (torch.randn(2, 3, 64, dtype=torch.bfloat16), w_q, w_absmax, None, 0.0))


def test_cuda_decomposition_is_the_op_in_aten_ops():
    """On CUDA the scheme opens the op up (Inductor fuses the outlier split into the quantization);
    off CUDA it declines and the op runs whole. The decomposition computes what the op does."""
    import fxquant
    from fxquant.ops.llm_int8 import llm_int8_linear_aten

    assert fxquant.SCHEMES["llm_int8"].decompositions() == {llm_int8_linear.default: llm_int8_linear_aten}
    w_q, w_absmax = quantize_llm_int8_weight(torch.randn(32, 64))
    x, bias = activations_with_outliers(4, 64), torch.randn(32)
    assert torch.equal(llm_int8_linear_aten(x, w_q, w_absmax, bias, 6.0), llm_int8_linear(x, w_q, w_absmax, bias, 6.0))
