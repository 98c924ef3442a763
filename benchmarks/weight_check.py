"""What `check_weight_updates` costs per call: the check that a quantized weight's parameter did not
change since it was quantized (fxquant/weight_updates.py: identity, version counter and storage of
every watched parameter, then one concatenation of their sampled values and one comparison, which
on CUDA waits for the GPU once per call).

Llama-3-8B-shaped decoder layers (e2e_llama.py's model, `use_cache=False`, `logits_to_keep=1`),
FP8 rowwise, decode-shaped forwards (1, 1) and (16, 1), compiled with `check_weight_updates` on and
off in the same run, in the default mode and with CUDA graphs (reduce-overhead). For each: median ms
per forward (each waited for), ms per forward issued back to back (where the check's wait for the
GPU costs most), and the check alone: µs per call of the wrapper around a no-op, on the same weights.

    python benchmarks/weight_check.py --layers 8 --out $OUT                         # GPU
    python benchmarks/weight_check.py --device cpu --layers 2 --hidden 256 --repeats 3   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
from e2e_llama import back_to_back_ms, llama3_8b, median_ms
from transformers import LlamaConfig, LlamaForCausalLM

import fxquant
from fxquant.weight_updates import RequantizeOnUpdate

SHAPES = [(1, 1), (16, 1)]


def model_config(layers: int, hidden: int | None) -> LlamaConfig:
    """Llama-3-8B's shape, or the same proportions at width `hidden` (heads of 128, 4 per KV head)."""
    config = llama3_8b(layers, tiny=False)
    if hidden is not None:
        heads = max(1, hidden // 128)
        config.update({"hidden_size": hidden, "intermediate_size": hidden * 7 // 2, "num_attention_heads": heads,
                       "num_key_value_heads": max(1, heads // 4), "head_dim": hidden // heads, "vocab_size": 1024})
    return config


def quantized_weights(backend: fxquant.Backend) -> list:
    """One QuantizedWeight per quantized copy that the backend's graphs run."""
    return list({id(e.quantized.copy): e.quantized for plan in backend.plans for e in plan.rewritten}.values())


def check_alone_us(weights: list, device: torch.device, repeats: int) -> float:
    """µs per call of the check on `weights`, around a no-op, waited for."""
    sources = [quantized.source for quantized in weights]
    check = RequantizeOnUpdate(lambda *args: None, list(enumerate(weights)))
    return median_ms(lambda: check(*sources), device, repeats) * 1e3


def run(model, mode: str, check: bool, device: torch.device, vocab: int, repeats: int) -> dict:
    torch._dynamo.reset()
    backend = fxquant.backend(scheme="fp8_rowwise", check_weight_updates=check, keep_graphs=True)
    kwargs = {} if mode == "default" else {"mode": mode}
    compiled = torch.compile(model, backend=backend, dynamic=False, **kwargs)
    result = {"mode": mode, "check_weight_updates": check, "shapes": {}}
    with torch.no_grad():
        for batch, tokens in SHAPES:
            ids = torch.randint(0, vocab, (batch, tokens), device=device)
            forward = lambda: compiled(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
            result["shapes"][f"{batch}x{tokens}"] = {
                "ms": median_ms(forward, device, repeats), "ms_back_to_back": back_to_back_ms(forward, device, repeats)}
        weights = quantized_weights(backend)
        result["weights_watched"] = len(weights)
        result["check_alone_us"] = check_alone_us(weights, device, repeats) if check else None
    print(json.dumps(result), flush=True)
    return result


def print_table(results: list[dict]) -> None:
    off = {(r["mode"], s): v for r in results if not r["check_weight_updates"] for s, v in r["shapes"].items()}
    print(f"{'mode':<16}{'check':<7}" + "".join(f"{s + ' ms':>12}{'+ms':>9}{'b2b ms':>10}{'+ms':>9}" for s in results[0]["shapes"])
          + f"{'check µs':>10}{'weights':>9}")
    for r in results:
        cells = ""
        for shape, v in r["shapes"].items():
            base = off.get((r["mode"], shape), v)
            cells += f"{v['ms']:>12.3f}{v['ms'] - base['ms']:>+9.3f}{v['ms_back_to_back']:>10.3f}"
            cells += f"{v['ms_back_to_back'] - base['ms_back_to_back']:>+9.3f}"
        alone = "-" if r["check_alone_us"] is None else f"{r['check_alone_us']:.1f}"
        print(f"{r['mode']:<16}{'on' if r['check_weight_updates'] else 'off':<7}{cells}{alone:>10}{r['weights_watched']:>9}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, help="a narrower model of the same proportions (for the CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", nargs="+", help="default: default and reduce-overhead on CUDA, default on the CPU")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=pathlib.Path, help="a folder for weight_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    modes = args.modes or (["default", "reduce-overhead"] if device.type == "cuda" else ["default"])
    config = model_config(args.layers, args.hidden)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | {args.layers} layers, hidden {config.hidden_size}, {dtype} | "
          f"{time.strftime('%Y-%m-%d')}")
    results = [run(model, mode, check, device, config.vocab_size, args.repeats) for mode in modes for check in (False, True)]
    print("+ms: with the check less without it, same mode and shape; b2b: forwards issued back to back")
    print_table(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "weight_check.json").write_text(json.dumps({"device": name, "layers": args.layers,
                                                               "hidden": config.hidden_size, "results": results}, indent=1))


if __name__ == "__main__":
    main()
