"""Where a decode-shaped forward spends its GPU time: the top kernels of one (batch, 1) forward of
the Llama-3-8B-shaped model (`e2e_llama.py`'s; `--model qwen3` or `mixtral`: `moe.py`'s MoE models, their
experts run by transformers' `grouped_mm`), bf16 torch.compile vs fxquant fp8_rowwise, default
compile mode (no CUDA graphs, so each kernel shows). Batch 1 compiles static, batch 16 then compiles
the dynamic-batch graph, as Dynamo does in a decode loop. `--tokens 2048` profiles prefill instead.
An fxquant peer may carry Inductor settings (`e2e_llama.peer_model`). Each forward's kernel
launches are counted (all, and Inductor's Triton kernels) and its GPU time is summed by category
(`by_category`: FP8 and bf16 GEMMs, lm_head, attention, Inductor kernels that fuse fxquant's
quantization, other Inductor kernels).

    python benchmarks/profile_decode.py --layers 8 --json $OUT/profile.json
    python benchmarks/profile_decode.py --layers 8 --batches 1 4 --tokens 2048 --json $OUT/profile_prefill.json
    python benchmarks/profile_decode.py --model qwen3 --layers 4 --batches 1 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
from e2e_llama import kernel_profile, llama3_8b, median_ms, peer_model
from moe import build_model, moe_config
from transformers import LlamaForCausalLM


CATEGORIES = (  # (category, kernel-name pattern), the first match wins
    ("attention", r"fmha|flash|AttentionKernel"),
    ("FP8 GEMM", r"triton_tem_fused_fp8|_splitk_kernel|_sum_splits_kernel|_grouped_gemm_kernel|f8f8bf16|qqtst|e4m3"),
    ("GEMM", r"nvjet|gemm|cutlass|splitKreduce|xmma"),
    ("Inductor kernels fusing fxquant ops", r"^triton_.*fp8_rowwise_(linear|grouped_mm|batched_mm)"),  # quantization, mostly
    ("other Inductor kernels", r"^triton_"),
)


def by_category(kernels: list[dict]) -> dict[str, float]:
    """µs per forward by CATEGORIES; the longest GEMM called once per forward is lm_head's (a
    decoder layer's run once per layer), its own category."""
    once = [k for k in kernels if k["calls"] == 1 and re.search(CATEGORIES[2][1], k["kernel"])]
    lm_head = max(once, key=lambda k: k["us"], default=None)
    totals: dict[str, float] = {}
    for k in kernels:
        category = next((c for c, pattern in CATEGORIES if re.search(pattern, k["kernel"])), "other")
        category = "lm_head GEMM" if k is lm_head else category
        totals[category] = totals.get(category, 0.0) + k["us"]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["llama", "qwen3", "mixtral"], default="llama")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--peers", nargs="+", default=["bf16", "fxquant"])
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.model == "llama":
        torch.manual_seed(0)
        with device:
            model = LlamaForCausalLM(llama3_8b(args.layers, tiny=False)).to(torch.bfloat16).eval()
    else:
        model = build_model(moe_config(args.model, args.layers, tiny=False), device, torch.bfloat16)
        model.config._experts_implementation = "grouped_mm"
    results = {}
    for peer in args.peers:
        torch._dynamo.reset()
        target, backend = peer_model(peer, model)
        compiled = torch.compile(target, backend=backend)
        with torch.no_grad():
            for batch in args.batches:
                ids = torch.randint(0, 1000, (batch, args.tokens), device=device)
                forward = lambda: compiled(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
                start = time.perf_counter()
                forward()
                torch.cuda.synchronize()
                first_s = time.perf_counter() - start
                kernels = kernel_profile(forward, device)
                ms = median_ms(forward, device, 10)
                totals = by_category(kernels)
                results[f"{peer} {batch}x{args.tokens}"] = {
                    "first_call_s": first_s, "ms": ms, "us_by_category": totals, "kernels": kernels}
                launches = sum(k["calls"] for k in kernels)
                triton = sum(k["calls"] for k in kernels if k["kernel"].startswith("triton_"))
                results[f"{peer} {batch}x{args.tokens}"].update(kernel_launches=launches, triton_launches=triton)
                print(f"== {peer} ({batch}, {args.tokens}): {ms:.3f} ms per forward, "
                      f"{sum(totals.values()):.0f} µs of GPU time, "
                      f"{launches} kernels launched ({triton} Triton)")
                print("  " + ", ".join(f"{c} {us:.0f} µs" for c, us in sorted(totals.items(), key=lambda i: -i[1])))
                for k in kernels[:14]:
                    print(f"  {k['us']:8.1f} µs  x{k['calls']:<4} {k['kernel'][:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
