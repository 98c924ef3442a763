"""Runs fxquant/kernels/gemm_4bit.py (the GEMV and the MMA kernel) and dequantize_4bit.py on CPU tensors and reports each output against the float64
product of x and the weight dequantized here from the bytes with bitsandbytes' tables; meant to run
under TRITON_INTERPRET=1 (tests/kernels/test_interpreted_gemm_4bit.py):

    TRITON_INTERPRET=1 python -m tests.kernels.interpreted_4bit_cases gemm '[{"m": 1, "n": 128, "k": 1024, ...}]'
"""

import json
import sys

import torch

from fxquant.ops.blockwise_4bit import code_table, dynamic_map, quantize_4bit


def reference_weight(tensors: dict, quant_type: str, blocksize: int) -> torch.Tensor:
    packed = tensors["weight"].long()
    n = packed.shape[0]
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(n, -1)
    absmax_q = tensors["weight_absmax"].reshape(-1).long()
    nested = tensors["weight_nested_absmax"][torch.arange(absmax_q.numel()) // 256]
    absmax = (dynamic_map()[absmax_q] * nested + tensors["weight_offset"]).reshape(n, -1)  # float32, as bnb
    values = code_table(quant_type)[codes].reshape(n, -1, blocksize) * absmax[..., None]  # float32 products
    return values.reshape(n, -1)


def dequantize(n: int, k: int, quant_type: str, blocksize: int, dtype: str) -> dict:
    """fxquant/kernels/dequantize_4bit.py against the weight dequantized here, bit for bit."""
    from fxquant.kernels.dequantize_4bit import dequantize_4bit

    torch.manual_seed(n + k)
    tensors = quantize_4bit(torch.randn(n, k) * 0.05, blocksize, quant_type)
    out = dequantize_4bit(tensors["weight"], tensors["weight_absmax"], tensors["weight_nested_absmax"],
                          tensors["weight_offset"].reshape(1), code_table(quant_type), dynamic_map(), blocksize,
                          getattr(torch, dtype))
    expected = reference_weight(tensors, quant_type, blocksize).to(getattr(torch, dtype))
    return {"shape": list(out.shape), "dtype": str(out.dtype), "equal": torch.equal(out, expected)}


def run(m: int, n: int, k: int, quant_type: str, blocksize: int, dtype: str) -> dict:
    from fxquant.kernels.gemm_4bit import gemm_4bit_partials, split_k_for
    from fxquant.ops.linear_4bit_partials import linear_from_partials

    torch.manual_seed(m * 7 + n + k)
    compute = getattr(torch, dtype)
    tensors = quantize_4bit(torch.randn(n, k) * 0.05, blocksize, quant_type)
    x = torch.randn(m, k).to(compute)
    stored = (tensors["weight"], tensors["weight_absmax"], tensors["weight_nested_absmax"], tensors["weight_offset"])
    partials = gemm_4bit_partials(x, *stored[:3], stored[3].reshape(1), code_table(quant_type), dynamic_map(), blocksize)
    out = linear_from_partials(partials, compute, None)
    weight = reference_weight(tensors, quant_type, blocksize).to(compute)  # rounded to the compute dtype, as the op
    exact = x.double() @ weight.double().t()
    scale = exact.abs().max().item()
    reference = torch.ops.fxquant.linear_4bit_partials(x, *stored, quant_type, blocksize)  # the op's CPU reference
    return {"shape": list(out.shape), "dtype": str(out.dtype), "splits": split_k_for(m, n, k, blocksize, 132),
            "worst": (out.double() - exact).abs().max().item() / scale,
            "partials_shape": list(partials.shape) == list(reference.shape),
            "partials_worst": (partials - reference).abs().max().item() / scale}

if __name__ == "__main__":
    kernel = {"gemm": run, "dequantize": dequantize}[sys.argv[1]]
    print(json.dumps([kernel(**case) for case in json.loads(sys.argv[2])]))
