"""fxquant quickstart: quantize a small Llama-style model with `torch.compile(backend="fxquant")`.

Prints the plan (which layers run quantized, which stay and why), the accuracy against the
unquantized model, first-call compile time and time per forward against plain torch.compile.
Runs on a CUDA GPU in bf16 when there is one, else on the CPU in fp32 (where int8 runs Inductor's
int8 GEMM, fast with VNNI or AMX, and the FP8 schemes their reference implementation: correct, not
fast). The "auto" row is the default scheme: what it chose here is printed under the plan.

    python examples/quickstart.py                     # auto and every scheme
    python examples/quickstart.py --scheme int8 --layers 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxquant


def build_model(layers: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)


def time_forward(fn, *args, repeats: int) -> float:
    """Median seconds per call, after warm-up."""
    for _ in range(3):
        fn(*args)
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", choices=[*fxquant.SCHEMES, "all"], default="all")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.layers, device, dtype)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), device=device)
    forward = lambda m: m(input_ids, use_cache=False).logits  # noqa: E731
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"
    print(f"fxquant {fxquant.__version__} | torch {torch.__version__} | {device.type} ({gpu}) | {dtype}")
    print(f"Llama-style model: {args.layers} layers, hidden 512, input {tuple(input_ids.shape)}\n")

    schemes = tuple(fxquant.SCHEMES) if args.scheme == "all" else (args.scheme,)
    print(fxquant.plan(model, input_ids, use_cache=False, config=fxquant.QuantConfig(scheme=schemes[0])))
    print(f"scheme 'auto' on this {device.type}: {fxquant.QuantConfig().decide('layer', device).note}\n")

    with torch.no_grad():
        reference = forward(model).float()
        rows = []
        for name, backend, options in [("torch.compile", "inductor", None)] + [(s, "fxquant", {"scheme": s}) for s in ("auto", *schemes)]:
            torch._dynamo.reset()  # each row compiles afresh (past 8 backends Dynamo would run the model uncompiled)
            compiled = torch.compile(model, backend=backend, options=options)
            start = time.perf_counter()
            logits = forward(compiled).float()
            compile_s = time.perf_counter() - start
            seconds = time_forward(forward, compiled, repeats=args.repeats)
            error = ((logits - reference).norm() / reference.norm()).item()
            top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            rows.append((name, compile_s, seconds, error, top1))

    baseline = rows[0][2]
    print(f"{'model':<15} {'first call s':>12} {'ms/forward':>11} {'vs compile':>11} {'logits rel err':>15} {'top-1 agree':>12}")
    for name, compile_s, seconds, error, top1 in rows:
        print(f"{name:<15} {compile_s:>12.1f} {seconds * 1e3:>11.2f} {baseline / seconds:>10.2f}x {error:>15.4f} {top1:>11.1%}")
    if device.type == "cpu":
        print("\nOn the CPU, int8 runs oneDNN's int8 GEMM through Inductor, fast with int8 dot products (VNNI,\n"
              "AMX); without them its GEMMs run as exact float32 matmuls, no faster than float, and 'auto'\n"
              "leaves the model unquantized. The FP8 schemes run their reference implementation (float\n"
              "matmul on dequantized values): their speed-ups need the GPU kernels (FBGEMM / torch._scaled_mm).")


if __name__ == "__main__":
    main()
