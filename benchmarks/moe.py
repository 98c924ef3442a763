"""MoE benchmark: bf16 torch.compile vs fxquant FP8 rowwise on Qwen3-30B-A3B- and Mixtral-8x7B-shaped layers.

Three parts, each selected with --parts:
  qwen3, mixtral   transformers' models built from configs (random weights, bf16, `use_cache=False`,
                   `logits_to_keep=1`), their experts run by transformers' `grouped_mm` (and `batched_mm`
                   at decode): decode shapes (1, 1) and (16, 1) with mode="reduce-overhead" (CUDA graphs),
                   prefill shapes (1, 2048) and (4, 2048) in the default mode; bf16 and fxquant in the same
                   run, ms per forward and the speed-up (the timing is benchmarks/e2e_llama.py's run_peer);
                   `--decode-implementations grouped_mm batched_mm` times both at decode.
                   Qwen3-30B-A3B: hidden 2048, 128 experts, top-8, expert width 768 (--qwen3-layers, 4);
                   Mixtral-8x7B: hidden 4096, 8 experts, top-2, width 14336 (--mixtral-layers, 2).
  configs          fxquant's Triton grouped kernel with each candidate tile against its default tiles, on
                   the same shapes at 1, 16, 256 and 2048 tokens (GPU time): the data for a per-GPU choice.
  kernels          the expert GEMMs alone (GPU time of CUDA-graph replays), on each model's gate_up and
                   down shapes, tokens x top-k rows spread evenly over the experts, 16..8192 tokens:
                   bf16 `torch._grouped_mm`; on operands already quantized, `torch._scaled_grouped_mm`,
                   FBGEMM's stacked grouped GEMM and fxquant's Triton kernel; fxquant's expert op compiled
                   from the bf16 activation (`unfused`: its own quantization kernel, plus the GEMM
                   fxquant's lowering picks); and
                   `fused`: the op compiled between its producer (RMSNorm of the tokens for gate_up,
                   whose op reads the rows by expert from them as the model's does after
                   passes/quantize_before_gather.py, so gate_up's `fused` holds the gather of the rows,
                   which the GEMM columns do not; SiLU·mul for down) and its consumer (SiLU·mul for
                   gate_up, the routing-weighted sum per token for down), less those two compiled alone,
                   so that the op's zeroing of rows past the groups fuses into the consumer as in the model; with its
                   ratio to the best library kernel alone (`fused/best`: the target is <= 1.1). Both are
                   compiled with the Inductor settings fxquant's backend gives a model (eager's bf16
                   roundings), `--inductor` changing them.

    python benchmarks/moe.py --parts kernels qwen3 mixtral --json moe.json
    python benchmarks/moe.py --parts qwen3 --decode-implementations batched_mm --shapes 1x1 16x1
    python benchmarks/moe.py --parts configs --json moe_configs.json
    python benchmarks/moe.py --parts kernels --profile --json moe_kernels.json   # + each fused op's kernels
    python benchmarks/moe.py --parts kernels --gemms qwen3.down --tokens 1024 8192 --profile
    python benchmarks/moe.py --parts kernels --gemms qwen3.down --tokens 8192 --inductor split_reductions=True
    python benchmarks/moe.py --tiny       # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import fxquant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_llama  # noqa: E402  (the repository's timing helpers)

DECODE_SHAPES = [(1, 1), (16, 1)]
PREFILL_SHAPES = [(1, 2048), (4, 2048)]
KERNEL_TOKENS = [16, 64, 256, 1024, 4096, 8192]
CONFIG_TOKENS = [1, 16, 256, 2048]  # decode (1, 1) and (16, 1), chunked prefill, (1, 2048)


def moe_config(name: str, layers: int, tiny: bool):
    """The model's config: the full-size layer shapes, or a tiny one with the same structure (--tiny)."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    if name == "qwen3":
        if tiny:
            return Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_experts=8, num_experts_per_tok=2)
        return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                              num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                              num_experts=128, num_experts_per_tok=8, max_position_embeddings=8192)
    if tiny:
        return MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=8192)


def build_model(config, device, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def run_model(name: str, layers: int, args, device, dtype) -> list[dict]:
    """The peers (bf16 and fxquant unless --peers) on the model, per experts implementation: decode shapes
    in CUDA graphs, prefill shapes in the default mode."""
    config = moe_config(name, layers, args.tiny)
    model = build_model(config, device, dtype)
    decode_mode = "default" if args.tiny else "reduce-overhead"  # CUDA graphs: a GPU's
    runs = [(implementation, decode_mode, DECODE_SHAPES) for implementation in args.decode_implementations]
    runs.append(("grouped_mm", "default", PREFILL_SHAPES))
    results = []
    for implementation, mode, shapes in runs:
        shapes = [shape for shape in shapes if not args.shapes or f"{shape[0]}x{shape[1]}" in args.shapes]
        if not shapes:
            continue
        model.config._experts_implementation = implementation  # the experts read it at each call
        e2e_llama.SHAPES = shapes
        group = []
        for peer in args.peers:
            result = e2e_llama.run_peer(peer, mode, model, device, config.vocab_size, args.repeats,
                                        count_recompiles=False)
            result.update(model=name, layers=layers, experts_implementation=implementation)
            group.append(result)
            print(json.dumps(result), flush=True)
        print(f"== {name} ({layers} layers), experts {implementation}")
        e2e_llama.print_table(group)
        results.extend(group)
    return results


def expert_shapes(name: str, tiny: bool) -> list[tuple[str, int, int, int, int]]:
    """(GEMM, experts, top-k, N, K) of the model's expert weights: gate_up [E, 2I, H], down [E, H, I]."""
    config = moe_config(name, 1, tiny)
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    width = getattr(config, "moe_intermediate_size", None) if name == "qwen3" else config.intermediate_size
    top_k, hidden = config.num_experts_per_tok, config.hidden_size
    return [(f"{name}.gate_up", experts, top_k, 2 * width, hidden), (f"{name}.down", experts, top_k, hidden, width)]


def time_ms(fn, device) -> float:
    """Median ms of fn: on CUDA replayed from a CUDA graph (GPU time; the Python and dispatch time of a
    call, tens of µs, would otherwise swamp these kernels, as benchmarks/gemm.py found at small M)."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return e2e_llama.median_ms(fn, device, 3)


def producer(gemm: str, rows: int, tokens: int, k: int, device):
    """The expert GEMM's activation as the model makes it, for the quantization to fuse into: gate_up's
    is the RMSNorm of the tokens, the op reading its rows by expert (`rows`, spread over the tokens);
    down's is SiLU·mul of gate_up's output. (function of the inputs to the op's activation arguments,
    the inputs)."""
    if gemm.endswith("gate_up"):
        hidden = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        weight = torch.rand(k, device=device, dtype=torch.bfloat16) + 0.5

        def normed(h, rows_by_expert):
            variance = h.float().pow(2).mean(-1, keepdim=True)
            return {"x": (h.float() * torch.rsqrt(variance + 1e-6)).to(h.dtype) * weight, "rows": rows_by_expert}

        return normed, (hidden, torch.arange(rows, device=device) % tokens)
    gate_up = torch.randn(rows, 2 * k, device=device, dtype=torch.bfloat16)
    return (lambda gu: {"x": torch.nn.functional.silu(gu[:, :k]) * gu[:, k:]}), (gate_up,)


def consumer(gemm: str, rows: int, top_k: int, n: int, device):
    """What the model does next with the expert GEMM's output, which the op's row mask fuses into:
    SiLU·mul of gate_up's halves; down's rows weighted by their routing weight and summed per token.
    (function of the output and its other inputs, those inputs)."""
    if gemm.endswith("gate_up"):
        return (lambda y: torch.nn.functional.silu(y[:, :n // 2]) * y[:, n // 2:]), ()
    weights = torch.rand(rows, device=device, dtype=torch.bfloat16)
    return (lambda y, w: (y * w.unsqueeze(-1)).view(-1, top_k, n).sum(1)), (weights,)


def kernel_table(args, device) -> list[dict]:
    """ms of each expert GEMM: bf16, each library kernel alone on quantized operands, fxquant's expert op
    from the bf16 activation (unfused: its own quantization kernel), and fused: the op compiled between
    its producer and its consumer, less those two alone (what the quantization and the GEMM add to
    the model)."""
    from fxquant.inductor.fp8_rowwise_grouped_mm import even_offsets
    from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
    from fxquant.ops.fp8_rowwise_grouped_gemm import KERNELS, available_kernels

    settings = e2e_llama.inductor_settings(args.inductor)
    rows_out = []
    tokens_list = args.tokens or ([4, 16] if args.tiny else KERNEL_TOKENS)
    print("ms per expert GEMM (speed-up over bf16 torch._grouped_mm); unfused: fxquant's op from the bf16 activation; "
          "fused: between its producer (gather / SiLU·mul) and consumer (SiLU·mul / weighted sum), less those; "
          "fused/best: over the best library kernel alone")
    print(f"{'gemm':<16}{'tokens':>7}{'bf16':>9}" + "".join(f"{k:>19}" for k in KERNELS)
          + f"{'unfused':>19}{'fused':>19}{'fused/best':>11}")
    for model in ("qwen3", "mixtral"):
        for gemm, experts, top_k, n, k in expert_shapes(model, args.tiny):
            if args.gemms and gemm not in args.gemms:
                continue
            torch.manual_seed(0)
            w = (torch.randn(experts, n, k, device=device) / k**0.5).to(torch.bfloat16)
            w_q, w_scale = quantize_fp8_rowwise(w)
            op = torch.ops.fxquant.fp8_rowwise_grouped_mm
            # compiled once per weight: the rows turn dynamic at the second token count (Dynamo's automatic
            # dynamic); with the Inductor settings fxquant's backend compiles a model with (and --inductor's).
            # Dynamo keys its cache by code object, which each weight's lambdas share: a fresh cache per weight
            # keeps the recompiles under its limit (past it, a function runs eagerly)
            torch._dynamo.reset()

            def compiled(fn):
                return e2e_llama.compile_with_fxquant_settings(fn, settings)

            unfused = compiled(lambda x, offsets: op(x, w_q, w_scale, offsets, None))
            make, _ = producer(gemm, 1, 1, k, device)
            use, _ = consumer(gemm, top_k, top_k, n, device)
            produce, consume = compiled(make), compiled(use)
            fused = compiled(lambda offsets, used, *inputs: use(op(w_q=w_q, w_scale=w_scale, offsets=offsets, **make(*inputs)), *used))
            kernels = [kernel for kernel in available_kernels(n, k) if device.type == "cuda"]
            for tokens in tokens_list:
                rows = tokens * top_k
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
                offsets = even_offsets(rows, experts, device)
                x_q, x_scale = quantize_fp8_rowwise(x)
                _, inputs = producer(gemm, rows, tokens, k, device)
                _, used = consumer(gemm, rows, top_k, n, device)
                y = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
                row = {"gemm": gemm, "tokens": tokens, "rows": rows, "n": n, "k": k, "experts": experts}
                if hasattr(torch, "_grouped_mm") and device.type == "cuda":
                    row["bf16"] = time_ms(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets), device)
                for kernel in kernels:
                    row[kernel] = time_ms(lambda: KERNELS[kernel](x_q, w_q, x_scale, w_scale, offsets), device)
                with torch.no_grad():
                    row["unfused"] = time_ms(lambda: unfused(x, offsets), device)
                    row["fused"] = (time_ms(lambda: fused(offsets, used, *inputs), device)
                                    - time_ms(lambda: produce(*inputs), device) - time_ms(lambda: consume(y, *used), device))
                    if args.profile:  # where the fused op's time goes: its kernels, by GPU time
                        row["fused_kernels"] = e2e_llama.kernel_profile(lambda: fused(offsets, used, *inputs), device)
                best = min((row[kernel] for kernel in kernels), default=None)
                row["fused_over_best_library"] = row["fused"] / best if best else None
                cells = "".join(f"{row[kn]:>10.4f} ({row['bf16'] / row[kn]:.2f}x)" if kn in row and "bf16" in row
                                else f"{row.get(kn, float('nan')):>19.4f}" for kn in (*KERNELS, "unfused", "fused"))
                ratio = row["fused_over_best_library"]
                print(f"{gemm:<16}{tokens:>7}{row.get('bf16', float('nan')):>9.4f}{cells}"
                      f"{ratio if ratio else float('nan'):>11.2f}", flush=True)
                rows_out.append(row)
    return rows_out


def config_table(args, device) -> list[dict]:
    """fxquant's Triton grouped kernel with each of `candidate_configs`' tiles against its default tiles
    (`grouped_config`), on each model's expert shapes at decode and prefill token counts (rows spread
    evenly over the experts): GPU ms per tile, the best and its gain over the default."""
    from fxquant.inductor.fp8_rowwise_grouped_mm import even_offsets
    from fxquant.kernels.fp8_rowwise_grouped_gemm import candidate_configs, fp8_rowwise_grouped_gemm_triton
    from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

    if device.type != "cuda":
        print("configs: the Triton kernel's tiles are timed on a GPU only")
        return []
    rows_out = []
    print(f"{'gemm':<16}{'tokens':>7}{'rows':>7}{'default ms':>12}{'best ms':>10}{'gain':>7}  best tiles")
    for model in ("qwen3", "mixtral"):
        for gemm, experts, top_k, n, k in expert_shapes(model, args.tiny):
            torch.manual_seed(0)
            w_q, w_scale = quantize_fp8_rowwise((torch.randn(experts, n, k, device=device) / k**0.5).to(torch.bfloat16))
            for tokens in CONFIG_TOKENS:
                rows = tokens * top_k
                x_q, x_scale = quantize_fp8_rowwise(torch.randn(rows, k, device=device, dtype=torch.bfloat16))
                offsets = even_offsets(rows, experts, device)
                timed = []
                for config in candidate_configs(rows, experts):
                    ms = time_ms(lambda: fp8_rowwise_grouped_gemm_triton(x_q, w_q, x_scale, w_scale, offsets, config), device)
                    timed.append({"config": config, "ms": ms})
                best = min(timed, key=lambda t: t["ms"])
                row = {"gemm": gemm, "tokens": tokens, "rows": rows, "n": n, "k": k, "experts": experts,
                       "default_ms": timed[0]["ms"], "best_ms": best["ms"], "best": best["config"], "timed": timed}
                print(f"{gemm:<16}{tokens:>7}{rows:>7}{row['default_ms']:>12.4f}{best['ms']:>10.4f}"
                      f"{row['default_ms'] / best['ms']:>6.2f}x  {best['config']}", flush=True)
                rows_out.append(row)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["kernels", "qwen3", "mixtral"],
                        choices=["kernels", "configs", "qwen3", "mixtral"])
    parser.add_argument("--qwen3-layers", type=int, default=4)
    parser.add_argument("--mixtral-layers", type=int, default=2)
    parser.add_argument("--decode-implementations", nargs="+", default=["grouped_mm"],
                        choices=["grouped_mm", "batched_mm"], help="experts implementations timed at decode shapes")
    parser.add_argument("--shapes", nargs="+", metavar="BATCHxTOKENS", help="only these of 1x1 16x1 1x2048 4x2048")
    parser.add_argument("--peers", nargs="+", default=["bf16", "fxquant"],
                        help="the model parts' peers (e2e_llama.py's names: fxquant-frozen skips the per-call weight check)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU, to test the script")
    parser.add_argument("--profile", action="store_true", help="kernels: also each fused op's kernels (in --json)")
    parser.add_argument("--gemms", nargs="+", choices=["qwen3.gate_up", "qwen3.down", "mixtral.gate_up", "mixtral.down"],
                        help="kernels: only these expert GEMMs")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"kernels: these token counts (default {KERNEL_TOKENS})")
    parser.add_argument("--inductor", default="", metavar="KEY=VALUE,...",
                        help="kernels: Inductor settings over fxquant's (e.g. split_reductions=True)")
    parser.add_argument("--json")
    args = parser.parse_args()
    global DECODE_SHAPES, PREFILL_SHAPES
    if args.tiny:
        DECODE_SHAPES, PREFILL_SHAPES = [(1, 1), (2, 1)], [(1, 16)]
        args.repeats = 2
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | {dtype}")
    report = {"device": name, "torch": torch.__version__}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    for part in args.parts:
        if part == "kernels":
            report["kernels"] = kernel_table(args, device)
        elif part == "configs":
            report["configs"] = config_table(args, device)
        else:
            layers = args.qwen3_layers if part == "qwen3" else args.mixtral_layers
            report[part] = run_model(part, layers, args, device, dtype)
        save()  # each part as it finishes: a timeout keeps what ran


if __name__ == "__main__":
    main()
