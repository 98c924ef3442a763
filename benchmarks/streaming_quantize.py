"""`fxquant quantize` on a checkpoint larger than memory: random bf16 weights of a Llama config
(default 13B-class: hidden 5120, intermediate 13824, 40 layers, vocab 32000, ~26 GB) written shard
by shard straight to disk (one tensor in memory at a time; config.json and the index written here),
then `python -m fxquant.cli quantize` on it in a subprocess, timed, its peak RSS read from
`/usr/bin/time -v` (else getrusage of the child). Prints one line for benchmarks/RESULTS.md and
deletes input and output unless --keep.

    python benchmarks/streaming_quantize.py --dir /tmp/fxquant-13b                 # ~26 GB in, ~13.5 GB out
    python benchmarks/streaming_quantize.py --dir /tmp/small --hidden 256 --intermediate 512 --layers 2 --vocab 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fxquant import empty_weights
from fxquant.checkpoint_writer import Piece, write_weights
from fxquant.footprint import nbytes


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128, vocab_size=args.vocab,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16",
    )


def write_random_checkpoint(directory: Path, config: LlamaConfig, max_shard_size: str) -> int:
    """A save_pretrained-shaped directory of random bf16 weights, written tensor by tensor; its bytes."""
    with empty_weights():
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)

    def make(name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        if name.endswith("norm.weight"):
            return {name: torch.ones(shape, dtype=torch.bfloat16)}
        return {name: torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)}

    directory.mkdir(parents=True)
    pieces = [Piece({name: (torch.bfloat16, shape)}, lambda name=name, shape=shape: make(name, shape)) for name, shape in shapes.items()]
    write_weights(directory, pieces, max_shard_size)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return sum(nbytes(torch.bfloat16, shape) for shape in shapes.values())


def run_quantize(dir_in: Path, dir_out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "fxquant.cli", "quantize", str(dir_in), str(dir_out), "--workers", str(args.workers),
               "--max-shard-size", args.out_shard_size]
    timed = Path("/usr/bin/time").is_file()
    start = time.perf_counter()
    result = subprocess.run((["/usr/bin/time", "-v"] if timed else []) + command, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"fxquant quantize failed:\n{result.stdout}\n{result.stderr}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr) if timed else None
    peak_kb = int(match.group(1)) if match else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_rss_bytes": peak_kb * 1024, "stdout": result.stdout, "command": " ".join(command)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/fxquant-streaming"))
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--intermediate", type=int, default=13824)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--in-shard-size", default="5GB", help="the input's shards (as save_pretrained's max_shard_size)")
    parser.add_argument("--out-shard-size", default="5GB", help="fxquant quantize --max-shard-size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep input and output")
    args = parser.parse_args()
    if args.dir.exists():
        raise SystemExit(f"{args.dir} exists; give a new directory")
    dir_in, dir_out = args.dir / "in", args.dir / "out"
    try:
        start = time.perf_counter()
        size = write_random_checkpoint(dir_in, llama_config(args), args.in_shard_size)
        written = time.perf_counter() - start
        run = run_quantize(dir_in, dir_out, args)
        out_size = sum(path.stat().st_size for path in dir_out.glob("*.safetensors"))
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        print(run["stdout"], end="")
        print(f"input written in {written:.0f} s")
        print(
            f"| fxquant quantize, Llama {args.layers} layers hidden {args.hidden} (bf16 {size / 1e9:.1f} GB, random) | "
            f"{run['seconds']:.0f} s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB ({run['peak_rss_bytes'] / size:.3f}x the "
            f"checkpoint), output {out_size / 1e9:.1f} GB | CPU, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, "
            f"{platform.machine()} | {date.today()} | `{' '.join(sys.argv)}` ({run['command'].split(' -m ')[1]}) |"
        )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
