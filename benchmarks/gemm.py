"""GEMM benchmark on Llama-3-8B linear shapes: bf16 vs fxquant's ops vs FBGEMM (GPU only).

For each (N, K) in the Llama-3-8B projections (`--layers`; also Qwen3-30B-A3B's attention
projections, `qwen3.qkv qwen3.o`) and each M (tokens), times with triton's
do_bench_cudagraph (median GPU time): bf16 F.linear; fxquant's fp8_rowwise_linear op called
eagerly (FBGEMM quantize + GEMM behind it); the same op compiled with fxquant's Inductor lowering
(the quantization kernel + the GEMM fxquant's heuristic picks), and with each GEMM choice forced
(our Triton template, our split-K kernel at M <= 16, FBGEMM, _scaled_mm) or max-autotuned; at
M <= 16 also each choice's GEMM alone (fxquant::fp8_rowwise_mm compiled on operands quantized
beforehand: the `mm_*` columns); the quantization fused into its producer, as in a Llama layer
(`fused_q+gemm`: RMSNorm -> fp8_rowwise_linear compiled, less RMSNorm compiled alone: what the
quantize + GEMM adds once the quantization is in RMSNorm's kernel); torch._scaled_mm alone on
pre-quantized input; FBGEMM quantize_fp8_per_row + f8f8bf16_rowwise; FBGEMM's GEMM alone. Unless
--rowwise-only: fxquant's int8_linear; fxquant's fp8_blockwise_linear, eager and compiled (group
quantization + cuBLAS's blockwise GEMM, or the Triton kernel), cuBLAS's blockwise GEMM alone, and
FBGEMM's blockwise GEMM alone (128 x 128 activation blocks, M a multiple of 128); fxquant's
fp8_tensorwise_linear, eager and compiled. Prints TFLOP/s and speed-ups over bf16; --json writes
every row.

    python benchmarks/gemm.py [--json out.json] [--m 1 16 128 1024 4096 16384] [--rowwise-only]
    python benchmarks/gemm.py --rowwise-only --m 1 16 --layers qwen3.qkv qwen3.o
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

import fxquant  # noqa: F401  (registers the ops)
from fxquant.inductor.fp8_rowwise_mm import SMALL_M
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.cublas_blockwise import cublas_blockwise_mm, cublas_blockwise_works
from fxquant.ops.fp8_blockwise import (
    quantize_fp8_blockwise_weight,
    quantize_fp8_groupwise,
)
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from fxquant.ops.int8 import quantize_int8_rowwise

LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# Qwen3-30B-A3B's dense layers (its attention; the experts are benchmarks/moe.py's), by --layers
QWEN3_MOE = {"qwen3.qkv": (5120, 2048), "qwen3.o": (2048, 4096)}
LAYERS = {**LLAMA3_8B, **QWEN3_MOE}


def bench(fn) -> float:
    """Median GPU ms of fn replayed from a CUDA graph: kernel time, not Python launch overhead (which
    exceeds the kernels' time at small M and is what e2e_llama.py's reduce-overhead mode removes)."""
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def compile_with_lowering(fn, x, gemm: str | None = None, *more_inputs):
    """fn compiled by Inductor with fxquant's lowering, as the backend does for CUDA graphs, and
    called once on (x, *more_inputs).

    gemm: None for fxquant's heuristic, "autotune" for max-autotune over every choice, else the
    choice to force (FXQUANT_GEMM).
    """
    from torch._inductor.compile_fx import compile_fx

    patches = {"emulate_precision_casts": True, "force_disable_caches": True, "max_autotune_gemm": gemm == "autotune"}
    if gemm in (None, "autotune"):
        os.environ.pop("FXQUANT_GEMM", None)
    else:
        os.environ["FXQUANT_GEMM"] = gemm

    def backend(gm, inputs):
        return compile_fx(gm, inputs, config_patches=patches)  # Inductor's table holds fxquant's decompositions

    torch._dynamo.reset()  # one fresh compile per shape; never the recompile limit's eager fallback
    compiled = torch.compile(fn, backend=backend, dynamic=False)
    compiled(x, *more_inputs)
    os.environ.pop("FXQUANT_GEMM", None)
    return compiled


ROWWISE_GEMMS = ["triton", "splitk", "fbgemm", "scaled_mm", "autotune"]


def rms_norm(x):
    """The producer an activation quantization fuses into (input_layernorm, post_attention_layernorm)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def rows(ms: list[int], layers: list[str], rowwise_only: bool):
    fbgemm = fbgemm_genai_available()
    for name in layers:
        n, k = LAYERS[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        w8, w8_scale = quantize_fp8_rowwise(w)
        wi8, wi8_scale = quantize_int8_rowwise(w)
        wb, wb_scale = quantize_fp8_blockwise_weight(w, (128, 128))
        wt, wt_scale = quantize_fp8_tensorwise(w)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x8, x8_scale = quantize_fp8_rowwise(x)
            fp8_linear = lambda x: torch.ops.fxquant.fp8_rowwise_linear(x, w8, w8_scale, None, None)  # noqa: E731
            # each compiled function is timed before the next compile (which resets Dynamo)
            norm = compile_with_lowering(rms_norm, x)
            norm_ms = bench(lambda: norm(x))
            norm_then_fp8 = compile_with_lowering(lambda x: fp8_linear(rms_norm(x)), x)
            fused_ms = bench(lambda: norm_then_fp8(x)) - norm_ms
            compiled_fp8 = compile_with_lowering(fp8_linear, x)
            times = {
                "bf16": bench(lambda: F.linear(x, w)),
                "fxquant_fp8": bench(lambda: fp8_linear(x)),
                "fxquant_compiled": bench(lambda: compiled_fp8(x)),
                "fused_q+gemm": fused_ms,
                "scaled_mm_gemm": bench(lambda: torch._scaled_mm(
                    x8, w8.t(), scale_a=x8_scale[:, None], scale_b=w8_scale[None, :], out_dtype=torch.bfloat16, use_fast_accum=True)),
            }
            for gemm in ROWWISE_GEMMS:
                if (gemm == "fbgemm" and not fbgemm) or (gemm == "splitk" and m > SMALL_M):
                    continue
                forced = compile_with_lowering(fp8_linear, x, gemm)
                times[f"compiled_{gemm}"] = bench(lambda: forced(x))
                if m <= SMALL_M and gemm != "autotune":  # the GEMM alone, on operands quantized beforehand
                    mm = compile_with_lowering(lambda x8, xs: torch.ops.fxquant.fp8_rowwise_mm(x8, w8, xs, w8_scale), x8, gemm, x8_scale)
                    times[f"mm_{gemm}"] = bench(lambda: mm(x8, x8_scale))
            if fbgemm:
                xq, xs = torch.ops.fbgemm.quantize_fp8_per_row(x)
                def fbgemm_quantize_and_gemm():
                    x8, x8_scale = torch.ops.fbgemm.quantize_fp8_per_row(x)
                    return torch.ops.fbgemm.f8f8bf16_rowwise(x8, w8, x8_scale, w8_scale)

                times["fbgemm_q+gemm"] = bench(fbgemm_quantize_and_gemm)
                times["fbgemm_gemm"] = bench(lambda: torch.ops.fbgemm.f8f8bf16_rowwise(xq, w8, xs, w8_scale))
            flops = 2 * m * n * k
            if not rowwise_only:
                times["fxquant_int8"] = bench(lambda: torch.ops.fxquant.int8_linear(x, wi8, wi8_scale, None))
                cublas = cublas_blockwise_works(x.device)  # checked once, before any CUDA graph capture
                blockwise_linear = lambda x: torch.ops.fxquant.fp8_blockwise_linear(x, wb, wb_scale, None, None)  # noqa: E731
                times["fxquant_blockwise"] = bench(lambda: blockwise_linear(x))
                compiled_blockwise = compile_with_lowering(blockwise_linear, x)
                times["fxquant_blockwise_compiled"] = bench(lambda: compiled_blockwise(x))
                if cublas:
                    xg, xg_scale = quantize_fp8_groupwise(x, 128)
                    times["cublas_blockwise_gemm"] = bench(lambda: cublas_blockwise_mm(xg, xg_scale, wb, wb_scale))
                times["fxquant_tensorwise"] = bench(lambda: torch.ops.fxquant.fp8_tensorwise_linear(x, wt, wt_scale, None, None))
                compiled_tensorwise = compile_with_lowering(
                    lambda x: torch.ops.fxquant.fp8_tensorwise_linear(x, wt, wt_scale, None, None), x)
                times["fxquant_tensorwise_compiled"] = bench(lambda: compiled_tensorwise(x))
                if fbgemm and m % 128 == 0:
                    xb, xb_scale = quantize_fp8_blockwise_weight(x, (128, 128))
                    times["fbgemm_blockwise_gemm"] = bench(
                        lambda: torch.ops.fbgemm.f8f8bf16_blockwise(xb, wb, xb_scale, wb_scale, 128, 128, 128))
            yield {"layer": name, "M": m, "N": n, "K": k, "ms": times,
                   "tflops": {key: flops / t / 1e9 for key, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 1024, 4096, 16384])
    parser.add_argument("--json")
    parser.add_argument("--layers", nargs="+", default=list(LLAMA3_8B), choices=list(LAYERS))
    parser.add_argument("--rowwise-only", action="store_true", help="only the fp8_rowwise columns")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | fbgemm genai {fbgemm_genai_available()}")
    results = []
    columns = ["bf16", "fxquant_fp8", "fxquant_compiled", "fused_q+gemm", *(f"compiled_{g}" for g in ROWWISE_GEMMS), "scaled_mm_gemm",
               "fbgemm_q+gemm", "fbgemm_gemm", *(f"mm_{g}" for g in ROWWISE_GEMMS if g != "autotune")]
    if not args.rowwise_only:
        columns += ["fxquant_int8", "fxquant_blockwise", "fxquant_blockwise_compiled", "cublas_blockwise_gemm",
                    "fbgemm_blockwise_gemm", "fxquant_tensorwise", "fxquant_tensorwise_compiled"]
    print(f"{'layer':<8}{'M':>6}" + "".join(f"{c:>17}" for c in columns) + "   (TFLOP/s; speed-up over bf16)")
    for row in rows(args.m, args.layers, args.rowwise_only):
        results.append(row)
        cells = "".join(
            f"{row['tflops'][c]:>9.1f} {row['ms']['bf16'] / row['ms'][c]:>5.2f}x " if c in row["ms"] else f"{'-':>17}"
            for c in columns
        )
        print(f"{row['layer']:<8}{row['M']:>6}{cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
