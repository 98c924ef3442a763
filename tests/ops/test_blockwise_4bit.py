"""4-bit blockwise ops (fxquant/ops/blockwise_4bit.py) against the bitsandbytes package on the CPU:
codes, absmax codes, nested absmax and offset bit-identical to `quantize_4bit(..., compress_statistics=
True)`; the linear op against a float64 reference built here from the codes and bnb's own tables,
and against `bitsandbytes.matmul_4bit`; opcheck."""

import pytest
import torch

from fxquant.ops.blockwise_4bit import code_table, dynamic_map, quantize_4bit

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional
linear_4bit = torch.ops.fxquant.linear_4bit


def bnb_quantize(weight, blocksize, quant_type):
    packed, state = BF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
    return packed, state


def weight_with_edge_cases(n, k, dtype, blocksize):
    torch.manual_seed(n * 1000 + k)
    weight = torch.randn(n, k) * 0.05
    weight[0, :blocksize] = 0  # a block of zeros: absmax 0
    weight[1, 3] = 1.5  # one large value in a block
    weight[-1] = weight[-1] * 1e-4  # tiny blocks: absmax far below the offset
    return weight.to(dtype)


def test_tables_are_bitsandbytes_own():
    assert torch.equal(dynamic_map(), BF.create_dynamic_map())
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(code_table(quant_type), BF.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 32, 256])
@pytest.mark.parametrize("shape", [(48, 256), (300, 512), (5, 1024)])
def test_quantization_is_bit_identical_to_bitsandbytes(quant_type, dtype, blocksize, shape):
    weight = weight_with_edge_cases(*shape, dtype, blocksize)
    packed, state = bnb_quantize(weight, blocksize, quant_type)
    ours = quantize_4bit(weight, blocksize, quant_type)
    n, k = shape
    assert ours["weight"].dtype == torch.uint8 and ours["weight"].shape == (n, k // 2)
    assert torch.equal(ours["weight"].reshape(-1), packed.reshape(-1)), "packed codes differ"
    assert ours["weight_absmax"].shape == (n, k // blocksize)
    assert torch.equal(ours["weight_absmax"].reshape(-1), state.absmax), "absmax codes differ"
    assert torch.equal(ours["weight_nested_absmax"], state.state2.absmax), "nested absmax differs"
    assert torch.equal(ours["weight_offset"], state.offset), "offset differs"


def reference_weight(tensors, quant_type, blocksize):
    """float64 [N, K] from the stored bytes, with bnb's tables and the formulas written out here."""
    packed = tensors["weight"].long()
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)
    values = BF.get_4bit_type(quant_type, device="cpu").double()[codes]
    absmax_codes = tensors["weight_absmax"].reshape(-1).long()
    nested = tensors["weight_nested_absmax"].double()
    block_index = torch.arange(absmax_codes.numel()) // 256
    absmax = BF.create_dynamic_map().double()[absmax_codes] * nested[block_index] + tensors["weight_offset"].double()
    absmax = absmax.reshape(packed.shape[0], -1).float().double()  # bnb dequantizes absmax in float32
    return (values.reshape(packed.shape[0], -1, blocksize) * absmax[..., None]).reshape(packed.shape[0], -1)


def call(x, tensors, quant_type, blocksize, compute_dtype=None, bias=None):
    return linear_4bit(x, tensors["weight"], tensors["weight_absmax"], tensors["weight_nested_absmax"],
                       tensors["weight_offset"], quant_type, blocksize, compute_dtype, bias)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("x_dtype,compute_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                   (torch.float32, "bfloat16"), (torch.float16, "float32")])
def test_linear_is_the_dequantized_weight_times_x_in_the_compute_dtype(quant_type, x_dtype, compute_dtype):
    torch.manual_seed(0)
    n, k, blocksize = 96, 256, 64
    tensors = quantize_4bit(torch.randn(n, k) * 0.05, blocksize, quant_type)
    x, bias = torch.randn(2, 3, k).to(x_dtype), torch.randn(n).to(x_dtype)
    y = call(x, tensors, quant_type, blocksize, compute_dtype, bias)
    assert y.dtype == x_dtype and y.shape == (2, 3, n)

    exact = x.double() @ reference_weight(tensors, quant_type, blocksize).t() + bias.double()
    dtype = x_dtype if compute_dtype is None else getattr(torch, compute_dtype)
    # bf16 / fp16: the dequantized weight and x rounded to the compute dtype, the product rounded to it
    # and to the output's (x's) dtype
    tolerances = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
    tolerance = max(tolerances[dtype], tolerances[x_dtype])
    worst = ((y.double() - exact).abs().max() / exact.abs().max()).item()
    assert worst < tolerance, f"{worst:.2e} relative to the largest output"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_bitsandbytes_matmul_4bit(quant_type, dtype):
    torch.manual_seed(1)
    n, k, blocksize = 64, 512, 64
    weight = (torch.randn(n, k) * 0.05).to(dtype)
    x = torch.randn(4, k, dtype=dtype)
    packed, state = bnb_quantize(weight, blocksize, quant_type)
    expected = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    ours = call(x, quantize_4bit(weight, blocksize, quant_type), quant_type, blocksize)
    # the same weight to the bit; only the GEMM's summation order can differ
    torch.testing.assert_close(ours, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_bad_shapes_are_named():
    tensors = quantize_4bit(torch.randn(32, 128), 64, "nf4")
    with pytest.raises(RuntimeError, match="K=64 but the packed weight holds K=128"):
        call(torch.randn(2, 64), tensors, "nf4", 64)
    with pytest.raises(RuntimeError, match="absmax codes must be uint8"):
        call(torch.randn(2, 128), tensors, "nf4", 32)


def test_opcheck():
    tensors = quantize_4bit(torch.randn(32, 128), 64, "fp4")
    args = (tensors["weight"], tensors["weight_absmax"], tensors["weight_nested_absmax"], tensors["weight_offset"], "fp4", 64)
    torch.library.opcheck(linear_4bit, (torch.randn(4, 128), *args, None, torch.randn(32)))
    torch.library.opcheck(linear_4bit, (torch.randn(2, 3, 128, dtype=torch.bfloat16), *args, "float32", None))
