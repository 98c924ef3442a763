"""GEMM benchmark on Llama-3-8B linear shapes: bf16 vs fxquant's ops vs FBGEMM (GPU only).

For each (N, K) in the Llama-3-8B projections and each M (tokens), times with triton's do_bench
(median): bf16 F.linear; fxquant's fp8_rowwise_linear (quantize + GEMM, as the compiled graph
calls it); FBGEMM quantize_fp8_per_row + f8f8bf16_rowwise; FBGEMM's GEMM alone; fxquant's
int8_linear. Prints TFLOP/s and speed-ups over bf16; --json writes every row.

    python benchmarks/gemm.py [--json out.json] [--m 1 16 128 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import fxquant  # noqa: F401  (registers the ops)
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.int8 import quantize_int8_rowwise

LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rows(ms: list[int]):
    fbgemm = fbgemm_genai_available()
    for name, (n, k) in LLAMA3_8B.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        w8, w8_scale = quantize_fp8_rowwise(w)
        wi8, wi8_scale = quantize_int8_rowwise(w)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            times = {
                "bf16": bench(lambda: F.linear(x, w)),
                "fxquant_fp8": bench(lambda: torch.ops.fxquant.fp8_rowwise_linear(x, w8, w8_scale, None, None)),
                "fxquant_int8": bench(lambda: torch.ops.fxquant.int8_linear(x, wi8, wi8_scale, None)),
            }
            if fbgemm:
                xq, xs = torch.ops.fbgemm.quantize_fp8_per_row(x)
                def fbgemm_quantize_and_gemm():
                    x8, x8_scale = torch.ops.fbgemm.quantize_fp8_per_row(x)
                    return torch.ops.fbgemm.f8f8bf16_rowwise(x8, w8, x8_scale, w8_scale)

                times["fbgemm_q+gemm"] = bench(fbgemm_quantize_and_gemm)
                times["fbgemm_gemm"] = bench(lambda: torch.ops.fbgemm.f8f8bf16_rowwise(xq, w8, xs, w8_scale))
            flops = 2 * m * n * k
            yield {"layer": name, "M": m, "N": n, "K": k, "ms": times,
                   "tflops": {key: flops / t / 1e9 for key, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 1024, 4096, 16384])
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | fbgemm genai {fbgemm_genai_available()}")
    results = []
    header = f"{'layer':<8}{'M':>6}{'bf16 TF/s':>10}{'fxq fp8':>9}{'fbgemm q+g':>11}{'fbgemm g':>9}{'fxq int8':>9}   speed-up vs bf16: fxq fp8 / fbgemm q+g / int8"
    print(header)
    for row in rows(args.m):
        results.append(row)
        tf, ms = row["tflops"], row["ms"]
        base = ms["bf16"]
        print(f"{row['layer']:<8}{row['M']:>6}{tf['bf16']:>10.1f}{tf['fxquant_fp8']:>9.1f}{tf.get('fbgemm_q+gemm', 0):>11.1f}"
              f"{tf.get('fbgemm_gemm', 0):>9.1f}{tf['fxquant_int8']:>9.1f}   "
              f"{base / ms['fxquant_fp8']:.2f}x / {base / ms.get('fbgemm_q+gemm', float('nan')):.2f}x / {base / ms['fxquant_int8']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
