"""FP8 blockwise ops (fxquant/ops/fp8_blockwise.py): the per-group activation quantizer and the
per-block weight quantizer (FBGEMM's scale rule per group / block), the GEMM against a float64
reference of the same quantized math, shape errors, opcheck, the inference-only backward."""

import pytest
import torch

from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight, quantize_fp8_groupwise
from fxquant.ops.fp8_common import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE

blockwise_linear = torch.ops.fxquant.fp8_blockwise_linear
quantize = torch.ops.fxquant.quantize_fp8_per_group

# opcheck's test_schema re-runs the op under a mode that needs fp8 arithmetic, which CPU torch
# lacks ("mul_cpu_reduced_float" not implemented); the other sub-checks run.
OPCHECK_TESTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# weight block (block_n, block_k) → a weight shape (N, K) of whole, non-square blocks
SHAPES = {(128, 128): (256, 384), (32, 64): (96, 192)}


def dequantize_groups(x_q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """x_q [M, K] * its per-group scale [M, K / group_size], in float64."""
    return x_q.double() * scale.double().repeat_interleave(group_size, dim=-1)


def dequantize_blocks(w_q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w_q [N, K] * its per-block scale [N / block_n, K / block_k], in float64."""
    expanded = scale.double().repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return w_q.double() * expanded


def test_group_quantizer_follows_fbgemm_semantics_per_group():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0, 0.0, 0.0, 0.0, 0.0, 1e-9, 0.0, 0.0, 0.0]])
    x_q, scale = quantize(x, 4)
    assert x_q.dtype == FP8_DTYPE and x_q.shape == (1, 12), f"x_q: {x_q.dtype} {tuple(x_q.shape)}"
    assert scale.dtype == torch.float32 and scale.shape == (1, 3), f"scale: {scale.dtype} {tuple(scale.shape)}"
    assert scale[0, 0].item() == pytest.approx(4.0 / FP8_MAX)
    assert scale[0, 1].item() == pytest.approx(FP8_MIN_SCALE), "an all-zero group gets FBGEMM's minimum scale"
    assert scale[0, 2].item() == pytest.approx(FP8_MIN_SCALE), "a tiny group is guarded by the minimum scale"
    assert x_q[0, :4].float().tolist() == [112.0, -224.0, 56.0, 448.0]
    assert torch.all(x_q[0, 4:].float() == 0)


def test_groups_are_scaled_independently():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0, 200.0, 300.0, 400.0]])
    x_q, scale = quantize_fp8_groupwise(x, 4)
    assert scale[0].tolist() == pytest.approx([4.0 / FP8_MAX, 400.0 / FP8_MAX])
    assert x_q[0].float().tolist() == [112.0, 224.0, 320.0, 448.0] * 2, "an outlier group must not flatten its neighbour"


def test_scale_ub_clamps_each_group_amax_and_saturates_outliers():
    x = torch.tensor([[1.0, 2000.0, -3000.0, 0.5, 1.0, 2.0, 3.0, 4.0]])
    x_q, scale = quantize(x, 4, 1200.0)
    assert scale[0].tolist() == pytest.approx([1200.0 / FP8_MAX, 4.0 / FP8_MAX]), "scale_ub clamps only the group above it"
    assert x_q.float()[0, 1].item() == FP8_MAX and x_q.float()[0, 2].item() == -FP8_MAX
    assert x_q[0, 4:].float().tolist() == [112.0, 224.0, 320.0, 448.0]


def test_group_quantizer_keeps_leading_dims():
    x_q, scale = quantize(torch.randn(2, 3, 64, dtype=torch.bfloat16), 32)
    assert x_q.shape == (2, 3, 64) and scale.shape == (2, 3, 2)


def test_weight_quantizer_has_one_scale_per_block():
    w = torch.randn(64, 128)
    w[:32, 64:] = 0.0  # block (0, 1) all zero
    w[32, 70] = 1000.0  # outlier in block (1, 1)
    w_q, scale = quantize_fp8_blockwise_weight(w, (32, 64))
    assert w_q.dtype == FP8_DTYPE and w_q.shape == (64, 128), f"w_q: {w_q.dtype} {tuple(w_q.shape)}"
    assert scale.dtype == torch.float32 and scale.shape == (2, 2), f"scale: {scale.dtype} {tuple(scale.shape)}"
    blocks = w.reshape(2, 32, 2, 64).abs().amax(dim=(1, 3))
    expected = (blocks.double() / FP8_MAX).float().clamp(min=FP8_MIN_SCALE)
    assert torch.equal(scale, expected), f"block scales {scale.tolist()}, want amax / 448 per block {expected.tolist()}"
    assert scale[0, 1].item() == pytest.approx(FP8_MIN_SCALE), "an all-zero block gets FBGEMM's minimum scale"
    assert w_q[32, 70].float().item() == FP8_MAX, "a block's amax maps to 448"


@pytest.mark.parametrize("block", list(SHAPES))
def test_quantizer_errors_are_within_e4m3_rounding(block):
    n, k = SHAPES[block]
    x, w = torch.randn(16, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    x_q, x_scale = quantize_fp8_groupwise(x, block[1])
    w_q, w_scale = quantize_fp8_blockwise_weight(w, block)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values, plus half the
    # smallest subnormal step (2^-9 * scale) near zero.
    x_step = x_scale.double().repeat_interleave(block[1], dim=-1)
    w_step = w_scale.double().repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    assert torch.all((dequantize_groups(x_q, x_scale, block[1]) - x).abs() <= x.abs() * 2**-4 + x_step * 2**-9)
    assert torch.all((dequantize_blocks(w_q, w_scale, block) - w).abs() <= w.abs() * 2**-4 + w_step * 2**-9)


@pytest.mark.parametrize("block", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_float64_reference_of_the_quantized_math(block, dtype, with_bias):
    torch.manual_seed(0)
    n, k = SHAPES[block]
    x, w = torch.randn(3, 5, k, dtype=dtype), torch.randn(n, k)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    w_q, w_scale = quantize_fp8_blockwise_weight(w, block)
    y = blockwise_linear(x, w_q, w_scale, bias, None)
    assert y.dtype == dtype and y.shape == (3, 5, n), f"y: {y.dtype} {tuple(y.shape)}"

    x_q, x_scale = quantize_fp8_groupwise(x.reshape(-1, k), block[1])
    exact = dequantize_groups(x_q, x_scale, block[1]) @ dequantize_blocks(w_q, w_scale, block).t()
    if bias is not None:
        exact = exact + bias.double()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(y.double().reshape(-1, n), exact, rtol=tolerance, atol=tolerance)

    full_precision = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    error = ((y.double() - full_precision).norm() / full_precision.norm()).item()
    assert 0 < error < 0.06, f"FP8 blockwise {block} error against the float64 product: {error:.4f}"


def test_linear_rejects_mismatched_shapes():
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(64, 128), (32, 64))
    with pytest.raises(RuntimeError, match=r"weight \[64, 128\] is not a whole number of \[3, 2\] blocks"):
        blockwise_linear(torch.randn(2, 128), w_q, torch.ones(3, 2), None, None)
    with pytest.raises(RuntimeError, match=r"weight \[64, 128\] is not a whole number of \[2, 3\] blocks"):
        blockwise_linear(torch.randn(2, 128), w_q, torch.ones(2, 3), None, None)
    with pytest.raises(RuntimeError, match="weight scale must be"):
        blockwise_linear(torch.randn(2, 128), w_q, w_scale.flatten(), None, None)
    with pytest.raises(RuntimeError, match="activation has K=96 but the weight is"):
        blockwise_linear(torch.randn(2, 96), w_q, w_scale, None, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        blockwise_linear(torch.randn(2, 128), w_q, w_scale, torch.randn(16), None)


def test_linear_on_zero_tokens():
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(64, 128), (32, 64))
    assert blockwise_linear(torch.randn(0, 128), w_q, w_scale, None, None).shape == (0, 64)


def test_opcheck():
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(64, 128), (32, 64))
    samples = [
        (torch.randn(4, 128), w_q, w_scale, torch.randn(64), None),
        (torch.randn(2, 3, 128, dtype=torch.bfloat16), w_q, w_scale, None, 100.0),
    ]
    for args in samples:
        torch.library.opcheck(blockwise_linear, args, test_utils=OPCHECK_TESTS)
    # With an input requiring grad, aot_dispatch would run the backward: the inference-only error, by design.
    requires_grad = (torch.randn(4, 128, requires_grad=True), w_q, w_scale, None, None)
    torch.library.opcheck(blockwise_linear, requires_grad, test_utils=OPCHECK_TESTS[:2])
    torch.library.opcheck(quantize, (torch.randn(2, 3, 128), 64, 10.0), test_utils=OPCHECK_TESTS)


def test_backward_is_a_clear_error():
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(64, 128), (32, 64))
    x = torch.randn(4, 128, requires_grad=True)
    y = blockwise_linear(x, w_q, w_scale, None, None)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


def test_group_quantizer_rejects_k_not_a_multiple_of_the_group():
    with pytest.raises(RuntimeError, match="K=48 is not a multiple of the group size 32"):
        torch.ops.fxquant.quantize_fp8_per_group(torch.randn(2, 48), 32)


def test_blockwise_mm_is_the_block_scaled_product_of_its_operands():
    """fxquant::fp8_blockwise_mm (the GEMM the Inductor lowering of the linear calls) vs float64."""
    torch.manual_seed(0)
    x_q, x_scale = quantize_fp8_groupwise(torch.randn(5, 256) * 3, 64)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(96, 256), (32, 64))
    out = torch.ops.fxquant.fp8_blockwise_mm(x_q, x_scale, w_q, w_scale)
    expected = dequantize_groups(x_q, x_scale, 64) @ dequantize_blocks(w_q, w_scale, (32, 64)).t()
    assert out.dtype == torch.bfloat16 and out.shape == (5, 96)
    # float32 sums of exact e4m3 products, then one bf16 rounding: within 2^-8 relative.
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-5).all()
    torch.library.opcheck(torch.ops.fxquant.fp8_blockwise_mm, (x_q, x_scale, w_q, w_scale), test_utils=OPCHECK_TESTS)


def test_cublas_path_takes_128_blocks_in_rows_of_four():
    """cuBLAS's blockwise GEMM is tried only for 128 x 128 weight blocks whose scale rows are a whole
    number of 4 blocks (the stride newer torch checks); everything else runs the Triton kernel."""
    from fxquant.ops.cublas_blockwise import cublas_blockwise_fits

    def fits(m, n, k, block):
        w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(n, k), block)
        return cublas_blockwise_fits(torch.empty(m, k, dtype=FP8_DTYPE), w_q, w_scale)

    assert fits(16, 256, 512, (128, 128))
    assert not fits(16, 256, 384, (128, 128)), "3 K-blocks per scale row"
    assert not fits(16, 256, 512, (64, 128)), "not 128 x 128 blocks"
    assert not fits(0, 256, 512, (128, 128)), "no tokens"
