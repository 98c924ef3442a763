"""Tensor-parallel Llama benchmark: bf16 TP torch.compile vs fxquant FP8 rowwise TP, same run.

Llama-3-8B-shaped layers (or `--shape 70b`: hidden 8192, MLP 28672, 64 heads, 8 KV heads), random
weights, bf16, sharded with `parallelize_module` as torchtitan does (column-wise q/k/v/gate/up,
row-wise o/down; embeddings and lm_head whole on every rank), one process per GPU on NCCL. Per
peer and shape: median ms per forward (each waited for), ms back to back, speed-ups over bf16 TP in
the same run, and the GPU memory each rank holds after its runs. Rank 0 prints the table.

    python benchmarks/tensor_parallel.py --ranks 2 --layers 8 --modes reduce-overhead
    python benchmarks/tensor_parallel.py --tiny        # two CPU processes on gloo: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from e2e_llama import back_to_back_ms, llama3_8b, median_ms, synchronize  # noqa: E402

PEERS = {"bf16": None, "fxquant": "fp8_rowwise"}


def llama3_70b(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def parallel_llama(args, mesh, device):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import LlamaForCausalLM

    config = llama3_8b(args.layers, args.tiny) if args.shape == "8b" else llama3_70b(args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    for layer in model.model.layers:
        parallelize_module(layer.self_attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                   "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
        parallelize_module(layer.mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                             "down_proj": RowwiseParallel()})
    return model, config.vocab_size


def run(rank: int, args, directory: str) -> None:
    import fxquant
    from torch.distributed.device_mesh import init_device_mesh

    cuda = not args.tiny
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{directory}/store", rank=rank,
                            world_size=args.ranks)
    mesh = init_device_mesh(device.type, (args.ranks,))
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    results = []
    for mode in args.modes:
        for peer in args.peers:
            torch._dynamo.reset()
            model, vocab = parallel_llama(args, mesh, device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            backend = "inductor" if PEERS[peer] is None else fxquant.backend(scheme=PEERS[peer])
            compiled = torch.compile(model, backend=backend, **({} if mode == "default" else {"mode": mode}))
            result = {"peer": peer, "mode": mode, "shapes": {}}
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for batch, tokens in shapes:
                    ids = torch.randint(0, vocab, (batch, tokens), generator=generator).to(device)
                    forward = lambda: compiled(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
                    result["shapes"][f"{batch}x{tokens}"] = {
                        "ms": median_ms(forward, device, args.repeats),
                        "ms_back_to_back": back_to_back_ms(forward, device, args.repeats)}
            synchronize(device)
            result["held_gib"] = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
            if rank == 0:
                print(json.dumps(result), flush=True)
            results.append(result)
            del compiled, model
    if rank == 0:
        table(results, [f"{b}x{t}" for b, t in shapes])
        if args.json:
            with open(args.json, "w") as file:
                json.dump({"ranks": args.ranks, "layers": args.layers, "shape": args.shape, "results": results}, file, indent=1)
    dist.destroy_process_group()


def table(results: list[dict], shapes: list[str]) -> None:
    for key, title in (("ms", "waited"), ("ms_back_to_back", "back to back")):
        print(f"{title}:")
        for result in results:
            base = next(r for r in results if r["mode"] == result["mode"] and r["peer"] == "bf16")
            cells = "".join(f"{result['shapes'][s][key]:>10.3f} {base['shapes'][s][key] / result['shapes'][s][key]:>5.2f}x"
                            for s in shapes)
            held = "-" if result["held_gib"] is None else f"{result['held_gib']:.2f}"
            print(f"  {result['mode']:<16}{result['peer']:<10}{cells}   held GiB {held}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shape", choices=["8b", "70b"], default="8b")
    parser.add_argument("--modes", nargs="+", default=["reduce-overhead"])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--shapes", nargs="+", default=["1x1", "16x1", "1x2048", "4x2048"], metavar="BATCHxTOKENS")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a tiny config on two CPU processes (gloo)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.layers, args.repeats, args.modes = ["1x1", "2x16"], 2, 2, ["default"]
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(run, args=(args, directory), nprocs=args.ranks)


if __name__ == "__main__":
    main()
