"""4-bit (NF4) linear vs bf16 on Llama-3-8B linear shapes (GPU only): fxquant's `linear_4bit` CUDA op
(one row: the fused dequantize-GEMV; more: dequantize, then cuBLAS) against bf16 `F.linear`, CUDA-graph
kernel time (benchmarks/gemm.py's `bench`), and the op's largest error relative to its reference.

    python benchmarks/gemm_4bit.py [--m 1 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import fxquant  # noqa: F401  (registers the ops)
from benchmarks.gemm import LLAMA3_8B, bench
from fxquant.ops.blockwise_4bit import linear_4bit_reference, quantize_4bit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    results = []
    for name, (n, k) in LLAMA3_8B.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        tensors = quantize_4bit(weight, 64, "nf4")
        arguments = (*(tensors[t] for t in ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset")), "nf4", 64)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            expected = linear_4bit_reference(x, *arguments).float()
            error = ((torch.ops.fxquant.linear_4bit(x, *arguments).float() - expected).abs().max() / expected.abs().max()).item()
            bf16_ms = bench(lambda: F.linear(x, weight))
            nf4_ms = bench(lambda: torch.ops.fxquant.linear_4bit(x, *arguments))
            results.append({"layer": name, "M": m, "N": n, "K": k, "bf16_ms": bf16_ms, "nf4_ms": nf4_ms, "relative_error": error})
            print(f"{name:8} M={m:<4} bf16 {bf16_ms * 1e3:7.1f} us  nf4 {nf4_ms * 1e3:7.1f} us  {bf16_ms / nf4_ms:5.2f}x"
                  f"  error {error:.1e} of the largest output", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
