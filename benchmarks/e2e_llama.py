"""End-to-end Llama benchmark: bf16 torch.compile vs fxquant FP8 rowwise vs torchao FP8 rowwise.

Llama-3-8B architecture (hidden 4096, 32 heads, 8 KV heads, MLP 14336), N decoder layers, random
weights, bf16, `use_cache=False`, `logits_to_keep=1`, lm_head left in bf16 on every side. For
each compile mode and peer: first-call seconds per input shape (compiles and the one dynamic
recompile included), median ms per forward (each forward waited for), ms per forward issued back
to back (`back_to_back_ms`: host time hidden where the GPU's is longer), speed-ups over bf16 in
the same run, peak GPU memory, and how many graphs Dynamo compiled over 8 further sequence lengths.

`--profile` adds each shape's top kernels by device time (name, calls and µs per forward) to the
JSON: where the time goes, for RESULTS.md's explanations. `--decode` runs the decode loop instead: HF `generate` with a static KV cache
(`cache_implementation="static"`), its decode steps compiled by generate itself with the peer's
backend in the given mode (`CompileConfig`; CUDA graphs with reduce-overhead), greedy, for batch 1
and 16 after a 128-token prompt: tokens/s, ms per token, and the graphs compiled during the timed
run (want 0: no recompile per token).

    python benchmarks/e2e_llama.py --layers 8 --modes default reduce-overhead --peers bf16 fxquant torchao
    python benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant --decode
    python benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant fxquant-per-layer   # the merge pass
    python benchmarks/e2e_llama.py --layers 8 --modes default --peers bf16 fxquant-blockwise       # fp8_blockwise in a model
    python benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant-int8    # int8 W8A8 in a model
    python benchmarks/e2e_llama.py --layers 8 --modes reduce-overhead --peers bf16 fxquant-inplace  # quantize_: memory held
    python benchmarks/e2e_llama.py --peers bf16 fxquant torchao --shapes 1x1 16x1   # a slow peer, split by shapes
    python benchmarks/e2e_llama.py --modes reduce-overhead --peers bf16 fxquant-nf4 torchao-int4 --shapes 1x1 16x1  # 4-bit
    python benchmarks/e2e_llama.py --modes default --peers bf16 fxquant fxquant:split_reductions=True --shapes 1x1 16x1
                                                   # fxquant's Inductor settings against one of Inductor's own
    python benchmarks/e2e_llama.py --tiny [--decode]     # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import statistics
import time

import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

import fxquant

SHAPES = [(1, 1), (16, 1), (1, 2048), (4, 2048)]
EXTRA_LENGTHS = [17, 100, 333, 512, 777, 1000, 1500, 1999]


def llama3_8b(layers: int, tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def setting_value(text: str) -> object:
    """An Inductor setting's value from the command line: a literal, or one of fxquant's choices classes."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        from fxquant.inductor import choices

        if not isinstance(getattr(choices, text, None), type):
            raise ValueError(f"{text!r}: want a Python literal or a class in fxquant/inductor/choices.py") from None
        return getattr(choices, text)


def inductor_settings(text: str) -> dict[str, object]:
    """Inductor settings from the command line's `key=value,key=value` (values: `setting_value`)."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {key: setting_value(value) for key, value in pairs}


def compile_with_fxquant_settings(fn, overrides: dict[str, object] | None = None):
    """`fn` compiled by Inductor with fxquant's decompositions and the Inductor settings its backend
    compiles a graph with (fxquant/inductor/settings.py, default mode), then `overrides`: a function
    of fxquant's ops timed as it runs in a model, without the backend's passes."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    from fxquant.inductor.install import scheme_decompositions
    from fxquant.inductor.settings import fxquant_inductor_settings

    table = {**select_decomp_table(), **scheme_decompositions()}
    patches = {**fxquant_inductor_settings({}), **(overrides or {})}
    return torch.compile(fn, backend=lambda gm, inputs: compile_fx(gm, inputs, decompositions=table, config_patches=patches))


def peer_model(peer: str, model: torch.nn.Module) -> tuple[torch.nn.Module, object]:
    """(model to compile, backend) for a peer. An fxquant peer takes Inductor settings after a colon,
    to compare them with fxquant's own: `fxquant:split_reductions=True,realize_opcount_threshold=30`;
    a value is a Python literal or the name of a class in fxquant/inductor/choices.py
    (`fxquant:inductor_choices_class=WholeRowReductions`)."""
    peer, _, settings = peer.partition(":")
    inductor = inductor_settings(settings)
    if inductor and not peer.startswith("fxquant"):
        raise ValueError(f"{peer}: Inductor settings are for fxquant peers")
    if peer == "bf16":
        return model, "inductor"
    if peer == "fxquant":
        return model, fxquant.backend(scheme="fp8_rowwise", inductor=inductor)
    if peer == "fxquant-frozen":  # without the per-call check for weights changed after compiling
        return model, fxquant.backend(scheme="fp8_rowwise", check_weight_updates=False, inductor=inductor)
    if peer == "fxquant-per-layer":  # q/k/v and gate/up as separate GEMMs, to measure the merge pass
        return model, fxquant.backend(scheme="fp8_rowwise", merge_parallel_linears=False, inductor=inductor)
    if peer == "fxquant-int8":  # int8 W8A8 (what scheme="auto" runs on GPUs without FP8, and on the CPU)
        return model, fxquant.backend(scheme="int8", inductor=inductor)
    if peer == "fxquant-int8-frozen":  # int8 without the per-call check for weights changed after compiling
        return model, fxquant.backend(scheme="int8", check_weight_updates=False, inductor=inductor)
    if peer == "fxquant-blockwise":  # DeepSeek-V3 style 128 x 128 weight blocks, 1 x 128 activation groups
        return model, fxquant.backend(scheme="fp8_blockwise", inductor=inductor)
    if peer == "fxquant-inplace":  # fxquant.quantize_ on the model itself (list it last): its float weights are gone
        fxquant.quantize_(model)
        return model, fxquant.backend(scheme="fp8_rowwise", inductor=inductor)
    if peer in ("fxquant-nf4", "fxquant-fp4", "fxquant-llm_int8"):  # the bitsandbytes family
        return model, fxquant.backend(scheme=peer.removeprefix("fxquant-"), inductor=inductor)
    if peer == "bnb-nf4":  # bitsandbytes' own Linear4bit (NF4, blocks of 64, double quantization), as load_in_4bit makes it
        return bitsandbytes_nf4(model), "inductor"
    if peer == "torchao-int4":  # torchao's int4 weight-only, groups of 128 (the nf4 stage's peer)
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        quantized = copy.deepcopy(model)
        quantize_(quantized, Int4WeightOnlyConfig(group_size=128),
                  filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn != "lm_head")
        return quantized, "inductor"
    if peer == "torchao":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantized = copy.deepcopy(model)
        quantize_(quantized, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn != "lm_head")
        return quantized, "inductor"
    raise ValueError(peer)


def bitsandbytes_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose linear layers but lm_head are bitsandbytes' Linear4bit (NF4, blocks of
    64, double quantization, the activation's dtype for compute): what transformers' load_in_4bit
    makes. The weights quantize as the copy moves to the model's device."""
    import bitsandbytes as bnb

    quantized = copy.deepcopy(model)
    for name, module in list(quantized.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or f"{name}.{child_name}".lstrip(".") == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, compress_statistics=True, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, blocksize=64,
                                             compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            setattr(module, child_name, layer.to(child.weight.device))
    return quantized


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def back_to_back_ms(fn, device: torch.device, repeats: int, batches: int = 3) -> float:
    """ms per call of `repeats` calls issued back to back with one synchronization (the median of
    `batches` such runs): the host's time between calls hides behind the GPU's where it is shorter,
    as in a decode loop that does not wait for each step, so host noise moves it less than
    median_ms, whose every call waits for the GPU."""
    fn()
    synchronize(device)
    runs = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        runs.append((time.perf_counter() - start) * 1e3 / repeats)
    return statistics.median(runs)


def kernel_profile(forward, device: torch.device, steps: int = 5) -> list[dict]:
    """The kernels of `steps` forwards, by total device time: [{name, calls, us per forward}], all of them."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            forward()
        synchronize(device)
    rows = []
    for event in prof.key_averages():
        total = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if total > 0:
            rows.append({"kernel": event.key, "calls": event.count // steps, "us": total / steps})
    return sorted(rows, key=lambda row: -row["us"])


def run_peer(peer: str, mode: str, model, device, vocab: int, repeats: int, profile: bool = False,
             count_recompiles: bool = True) -> dict:
    torch._dynamo.reset()
    counters.clear()
    target, backend = peer_model(peer, model)
    kwargs = {} if mode == "default" else {"mode": mode}
    compiled = torch.compile(target, backend=backend, **kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"peer": peer, "mode": mode, "shapes": {}}
    with torch.no_grad():
        for batch, tokens in SHAPES:
            ids = torch.randint(0, vocab, (batch, tokens), device=device)
            forward = lambda: compiled(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
            start = time.perf_counter()
            forward()
            synchronize(device)
            first_call_s = time.perf_counter() - start
            result["shapes"][f"{batch}x{tokens}"] = {
                "first_call_s": first_call_s, "ms": median_ms(forward, device, repeats),
                "ms_back_to_back": back_to_back_ms(forward, device, repeats)}
            print(f"{peer} {mode} {batch}x{tokens}: {result['shapes'][f'{batch}x{tokens}']}", flush=True)
            if profile:
                result["shapes"][f"{batch}x{tokens}"]["kernels"] = kernel_profile(forward, device)
        result["recompiles_over_8_lengths"] = None
        if count_recompiles:
            graphs_before = counters["stats"]["unique_graphs"]
            for tokens in EXTRA_LENGTHS:
                compiled(torch.randint(0, vocab, (1, tokens), device=device), use_cache=False, logits_to_keep=1)
            result["recompiles_over_8_lengths"] = counters["stats"]["unique_graphs"] - graphs_before
    result["graphs"] = counters["stats"]["unique_graphs"]
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    # held: the model's weights, the quantized ones and the graphs' buffers, once the runs are over
    result["held_gib"] = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    return result


DECODE_BATCHES = [1, 16]
PROMPT_TOKENS = 128
NEW_TOKENS = 64


def run_decode(peer: str, mode: str, model, device, vocab: int, repeats: int) -> dict:
    """Greedy generate with a static cache, its decode steps compiled the way HF does it: generate
    compiles the model's call itself (`generation_config.compile_config`, here with the peer's
    backend and `mode`) and runs the prefill uncompiled. ms per token = the time of 64 new tokens
    less that of 1 (same prompt, so the prefill cancels), after one warm-up of each; the median of
    `repeats` such pairs."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    target, backend = peer_model(peer, model)
    compile_config = CompileConfig(backend=backend, mode=mode, fullgraph=True)
    compile_config._compile_all_devices = device.type != "cuda"  # HF compiles on CUDA only, unless told
    result = {"peer": peer, "mode": mode, "decode": {}}
    with torch.no_grad():
        for batch in DECODE_BATCHES:
            ids = torch.randint(0, vocab, (batch, PROMPT_TOKENS), device=device)

            def generate(new_tokens: int) -> float:
                start = time.perf_counter()
                target.generate(
                    ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                    compile_config=compile_config)
                synchronize(device)
                return time.perf_counter() - start

            first_s = generate(NEW_TOKENS)
            generate(1)
            graphs_before = counters["stats"]["unique_graphs"]
            seconds = statistics.median(generate(NEW_TOKENS) - generate(1) for _ in range(repeats))
            result["decode"][f"batch {batch}"] = {
                "first_call_s": first_s, "tokens_per_s": batch * (NEW_TOKENS - 1) / seconds,
                "ms_per_step": seconds / (NEW_TOKENS - 1) * 1e3,
                "recompiles": counters["stats"]["unique_graphs"] - graphs_before,
                "graphs": counters["stats"]["unique_graphs"],
            }
    return result


def print_decode_table(results: list[dict]) -> None:
    base = {(r["mode"], b): v["ms_per_step"] for r in results if r["peer"] == "bf16" for b, v in r["decode"].items()}
    print(f"decode loop: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, static cache, greedy")
    for r in results:
        cells = "".join(
            f"  {b}: {v['ms_per_step']:.3f} ms/token {base.get((r['mode'], b), float('nan')) / v['ms_per_step']:.2f}x "
            f"{v['tokens_per_s']:.0f} tok/s (1st {v['first_call_s']:.1f} s, {v['recompiles']} recompiles)"
            for b, v in r["decode"].items()
        )
        print(f"{r['mode']:<16}{r['peer']:<18}{cells}")


def ratio_cells(results: list[dict], key: str) -> tuple[int, list[str]]:
    """The peer column's width and each result's `key` ms per shape with its speed-up over bf16."""
    base = {(r["mode"], s): v[key] for r in results if r["peer"] == "bf16" for s, v in r["shapes"].items()}
    width = max(18, *(len(r["peer"]) + 2 for r in results))
    return width, ["".join(f"{v[key]:>12.3f}{base.get((r['mode'], s), float('nan')) / v[key]:>6.2f}x"
                           for s, v in r["shapes"].items()) for r in results]


def print_table(results: list[dict]) -> None:
    width, cells = ratio_cells(results, "ms")
    print(f"{'mode':<16}{'peer':<{width}}" + "".join(f"{s + ' ms':>12}{'x':>7}" for s in results[0]["shapes"])
          + f"{'1st call s':>11}{'peak GiB':>9}{'held GiB':>9}{'recomp':>7}")
    for r, row in zip(results, cells):
        first = sum(v["first_call_s"] for v in r["shapes"].values())
        peak, held = (f"{r[key]:>9.2f}" if r.get(key) is not None else f"{'-':>9}" for key in ("peak_gib", "held_gib"))
        recompiles = r["recompiles_over_8_lengths"]
        print(f"{r['mode']:<16}{r['peer']:<{width}}{row}{first:>11.1f}{peak}{held}{'-' if recompiles is None else recompiles:>7}")


def print_back_to_back(results: list[dict]) -> None:
    width, cells = ratio_cells(results, "ms_back_to_back")
    print("back to back (one synchronization per --repeats forwards):")
    for r, row in zip(results, cells):
        print(f"{r['mode']:<16}{r['peer']:<{width}}{row}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"])
    parser.add_argument("--peers", nargs="+", default=["bf16", "fxquant", "torchao"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a tiny config on the CPU, to test the script")
    parser.add_argument("--decode", action="store_true", help="the static-cache generate loop instead of single forwards")
    parser.add_argument("--decode-repeats", type=int, default=5, help="(64-token, 1-token) generate pairs timed")
    parser.add_argument("--profile", action="store_true", help="also record each shape's top kernels (in --json)")
    parser.add_argument("--shapes", nargs="+", metavar="BATCHxTOKENS",
                        help="forward shapes to time (default: 1x1 16x1 1x2048 4x2048), to split a slow peer's run")
    parser.add_argument("--no-recompile-check", action="store_true",
                        help="skip the 8 extra sequence lengths (recompile count), to fit a slow peer in a call")
    parser.add_argument("--json")
    args = parser.parse_args()
    if "fxquant-inplace" in args.peers[:-1] or ("fxquant-inplace" in args.peers and len(args.modes) > 1):
        parser.error("fxquant-inplace quantizes the model itself: list it last, with one mode")
    global SHAPES, EXTRA_LENGTHS, DECODE_BATCHES, PROMPT_TOKENS, NEW_TOKENS
    if args.tiny:
        SHAPES, EXTRA_LENGTHS = [(1, 1), (2, 1), (1, 32)], [3, 5, 7]
        DECODE_BATCHES, PROMPT_TOKENS, NEW_TOKENS = [1, 2], 8, 4
    if args.shapes:
        SHAPES = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = llama3_8b(args.layers, args.tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | Llama-3-8B shape, {args.layers} layers, {dtype}")
    results = []
    for mode in args.modes:
        for peer in args.peers:
            if args.decode:
                results.append(run_decode(peer, mode, model, device, config.vocab_size, args.decode_repeats))
            else:
                results.append(run_peer(peer, mode, model, device, config.vocab_size, args.repeats, args.profile,
                                        not args.no_recompile_check))
            print(json.dumps(results[-1]), flush=True)  # each peer as it finishes: a timeout keeps what ran
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    if args.decode:
        print_decode_table(results)
    else:
        print_table(results)
        print_back_to_back(results)


if __name__ == "__main__":
    main()
