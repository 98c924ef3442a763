"""The bitsandbytes family on the GPU. nf4 / fp4: the op's CUDA implementation (the fused Triton
kernel for M <= 16, dequantize then cuBLAS above) against a float64 reference, and the scheme under
torch.compile with CUDA graphs. llm_int8: compiled, its CUDA decomposition (the outlier split fused
by Inductor into the activation's quantization) against the eager op."""

import pytest
import torch
from torch import nn

import fxquant
from fxquant.ops.blockwise_4bit import dequantize_4bit, quantize_4bit

pytestmark = pytest.mark.gpu
linear_4bit = torch.ops.fxquant.linear_4bit


def arguments(tensors, quant_type, blocksize, device):
    return (*(tensors[name].to(device) for name in ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset")),
            quant_type, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("rows", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_op_matches_the_reference(quant_type, rows, dtype):
    torch.manual_seed(rows)
    n, k, blocksize = 4096 + 64, 4096, 64
    tensors = quantize_4bit(torch.randn(n, k) * 0.02, blocksize, quant_type)
    x, bias = torch.randn(rows, k, dtype=dtype), torch.randn(n, dtype=dtype)
    y = linear_4bit(x.cuda(), *arguments(tensors, quant_type, blocksize, "cuda"), None, bias.cuda())
    weight = dequantize_4bit(*arguments(tensors, quant_type, blocksize, "cpu")[:4], quant_type, blocksize).to(dtype)
    exact = x.double() @ weight.double().t() + bias.double()
    worst = ((y.cpu().double() - exact).abs().max() / exact.abs().max()).item()
    assert worst < 2.0**-7, f"{worst:.2e} of the largest output"


def test_reduce_overhead_decode_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096, bias=False), nn.SiLU(), nn.Linear(4096, 1024, bias=False)).cuda().bfloat16()
    config = fxquant.QuantConfig(scheme="nf4")
    compiled = torch.compile(model, backend=fxquant.backend(config), mode="reduce-overhead")
    for rows in (1, 16, 1, 16):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = compiled(x).clone()
            tensors = [fxquant.SCHEMES["nf4"].quantize(layer.weight, fxquant.SCHEMES["nf4"].options({}))
                       for layer in (model[0], model[2])]
            hidden = linear_4bit(x, *arguments(tensors[0], "nf4", 64, "cuda"))
            expected = linear_4bit(torch.nn.functional.silu(hidden), *arguments(tensors[1], "nf4", 64, "cuda"))
        torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [1, 16, 300])
def test_llm_int8_decomposed_matches_the_op(rows):
    torch.manual_seed(rows)
    layer = nn.Linear(1024, 512).cuda().bfloat16()
    model = nn.Sequential(nn.LayerNorm(1024), layer).cuda().bfloat16()
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    x[:, 7] *= 40  # an outlier feature
    backend = fxquant.backend(fxquant.QuantConfig(scheme="llm_int8"), keep_graphs=True)
    with torch.no_grad():
        compiled = torch.compile(model, backend=backend)(x)
        tensors = fxquant.SCHEMES["llm_int8"].quantize(layer.weight, fxquant.SCHEMES["llm_int8"].options({}))
        eager = torch.ops.fxquant.llm_int8_linear(model[0](x), tensors["weight"], tensors["weight_absmax"], layer.bias, 6.0)
    scale = eager.float().abs().max().item()
    assert (compiled.float() - eager.float()).abs().max().item() < 2e-2 * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_kernel_is_the_reference_within_a_rounding(dtype):
    """The GPU contracts absmax = map[q] * nested + offset into one FMA, the CPU reference rounds twice:
    the float32 absmax can differ in its last bit, so the weight by up to one rounding of `dtype`
    (measured on the H200: not bit-exact in any dtype)."""
    from fxquant.kernels.dequantize_4bit import dequantize_4bit as dequantize_kernel
    from fxquant.ops.blockwise_4bit import code_table, dynamic_map

    tensors = quantize_4bit(torch.randn(1000, 4096) * 0.02, 64, "nf4")
    cuda = arguments(tensors, "nf4", 64, "cuda")
    out = dequantize_kernel(*cuda[:3], cuda[3].reshape(1), code_table("nf4").cuda(), dynamic_map().cuda(), 64, dtype)
    expected = dequantize_4bit(*arguments(tensors, "nf4", 64, "cpu")[:4], "nf4", 64).to(dtype)
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=2 * torch.finfo(dtype).eps, atol=0)
