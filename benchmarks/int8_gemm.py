"""int8 GEMM benchmark on Llama-3-8B linear shapes (GPU only): bf16 against fxquant's int8_linear
compiled with its Inductor lowering, RMSNorm in front (the quantization fuses into it, as in a layer).

For each (N, K) and M: bf16 `F.linear` after the RMSNorm, compiled; int8 with fxquant's heuristic;
each GEMM choice forced (`FXQUANT_INT8_GEMM`: the Triton template, split-K at M <= 16, cuBLAS at
M > 16); max-autotune over all of them. Median GPU ms from CUDA graphs (benchmarks/gemm.py's
`bench`), speed-ups over bf16: what sets `int8_cublas_min_rows` and the decode choice in
fxquant/inductor/tuning.py.

    python benchmarks/int8_gemm.py [--m 1 16 128 2048] [--layers qkv o gate_up down] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx

import fxquant  # noqa: F401  (registers the ops and lowerings)
from benchmarks.gemm import LLAMA3_8B, bench, rms_norm
from fxquant.ops.int8 import quantize_int8_rowwise

CHOICES = ["heuristic", "triton", "splitk", "cublas", "autotune"]


def compiled(fn, x, choice: str):
    """fn compiled by Inductor with fxquant's lowering, the int8 GEMM choice forced (or not), called once."""
    patches = {"force_disable_caches": True, "max_autotune_gemm": choice == "autotune"}
    os.environ.pop("FXQUANT_INT8_GEMM", None)
    if choice not in ("heuristic", "autotune"):
        os.environ["FXQUANT_INT8_GEMM"] = choice
    torch._dynamo.reset()
    function = torch.compile(fn, dynamic=False, backend=lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches))
    function(x)
    os.environ.pop("FXQUANT_INT8_GEMM", None)
    return function


def rows(ms: list[int], layers: list[str]):
    for name in layers:
        n, k = LLAMA3_8B[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        w_q, w_scale = quantize_int8_rowwise(w)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = compiled(lambda x: F.linear(rms_norm(x), w), x, "heuristic")
            times = {"bf16": bench(lambda: bf16(x))}
            for choice in CHOICES:
                if (choice == "splitk" and m > 16) or (choice == "cublas" and m <= 16):
                    continue
                int8 = compiled(lambda x: torch.ops.fxquant.int8_linear(rms_norm(x), w_q, w_scale, None), x, choice)
                times[f"int8_{choice}"] = bench(lambda: int8(x))
            yield {"layer": name, "M": m, "N": n, "K": k, "ms": times}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 2048])
    parser.add_argument("--layers", nargs="+", default=list(LLAMA3_8B), choices=list(LLAMA3_8B))
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    columns = ["bf16", *(f"int8_{c}" for c in CHOICES)]
    print(f"{'layer':<8}{'M':>6}" + "".join(f"{c:>22}" for c in columns) + "   (ms; speed-up over bf16)")
    results = []
    for row in rows(args.m, args.layers):
        results.append(row)
        cells = "".join(f"{row['ms'][c]:>14.4f} {row['ms']['bf16'] / row['ms'][c]:>5.2f}x " if c in row["ms"] else f"{'-':>22}"
                        for c in columns)
        print(f"{row['layer']:<8}{row['M']:>6}{cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
