"""The Triton kernels a compiled forward launches, per peer, counted on a machine without a GPU.

Inductor writes Triton code for the CPU too (`cpu_backend="triton"`), with the same scheduling and
fusion as for CUDA; this script lets it write each graph's wrapper, stops before anything is
compiled for the device, and counts the Triton kernels the wrapper launches (extern calls, such as
fxquant's GEMM ops, are listed apart). fxquant's ops are lowered as on CUDA. Tiny models with the
benchmark models' structure (benchmarks/e2e_llama.py's Llama, benchmarks/moe.py's Qwen3-MoE and
Mixtral), one layer: at decode the kernel count is what CUDA graphs replay, where each kernel
costs launch time whatever its size.

    python benchmarks/kernel_count.py --model qwen3 --shapes 1x1 16x1 1x2048 --peers bf16 fxquant fxquant:realize_opcount_threshold=60
    python benchmarks/kernel_count.py --model llama --list    # each launch too

Uses Inductor internals (the code cache's loader, Triton's backend hash): torch 2.13 as in CI.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from unittest import mock

import torch
import torch.utils._triton
from torch._inductor import config as inductor_config
from torch._inductor.codecache import PyCodeCache

import fxquant
import fxquant.inductor.install

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_llama  # noqa: E402  (the repository's benchmark helpers)
import moe  # noqa: E402


class WrapperWritten(Exception):
    """Raised where Inductor loads a graph's wrapper: the code is written, nothing compiled yet."""

    def __init__(self, source: str):
        super().__init__("wrapper written")
        self.source = source


def tiny_model(name: str) -> torch.nn.Module:
    if name == "llama":
        config = e2e_llama.llama3_8b(1, tiny=True)
    elif name == "mixtral":
        config = moe.moe_config("mixtral", 1, tiny=True)
    else:  # Qwen3-MoE, wider than moe.py's tiny config so that the experts' GEMMs are not trivial
        config = moe.moe_config("qwen3", 1, tiny=True)
        config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok = 256, 128, 16, 4
    model = moe.build_model(config, "cpu", torch.bfloat16)
    model.config._experts_implementation = "grouped_mm"
    return model


def wrapper_source(model: torch.nn.Module, peer: str, batch: int, tokens: int) -> str:
    """The wrapper Inductor writes for `model` on `batch` sequences of `tokens` under `peer` (bf16, or
    an fxquant peer of e2e_llama's)."""
    _, backend = e2e_llama.peer_model(peer, model)
    original = PyCodeCache.load_by_key_path.__func__

    def load(cls, key, path, *args, **kwargs):
        source = open(path).read()
        if "def call(" in source:
            raise WrapperWritten(source)
        return original(cls, key, path, *args, **kwargs)

    ids = torch.randint(0, model.config.vocab_size, (batch, tokens))
    torch._dynamo.reset()
    with (mock.patch.object(fxquant.inductor.install, "LOWERED_DEVICE_TYPES", frozenset({"cuda", "cpu"})),
          mock.patch.object(torch.utils._triton, "triton_hash_with_backend", lambda: "0" * 64),
          mock.patch.object(PyCodeCache, "load_by_key_path", classmethod(load)),
          inductor_config.patch(cpu_backend="triton"), torch.no_grad()):
        try:
            torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False, logits_to_keep=1)
        except Exception as error:  # Dynamo wraps the backend's exception
            cause = error
            while cause is not None and not isinstance(cause, WrapperWritten):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            return cause.source
    raise RuntimeError(f"{peer}: Inductor loaded no wrapper")


def launches(source: str) -> tuple[list[str], list[str]]:
    """(the Triton kernels the wrapper's call() launches, in order; its extern calls)."""
    call = source[source.index("def call("):]
    kernels = re.findall(r"^\s+(\w+)\.run\(", call, re.MULTILINE)
    externs = re.findall(r"^\s+(?:\w+ = )?(?:extern_kernels\.|torch\.ops\.)([\w.]+)\(", call, re.MULTILINE)
    return kernels, externs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["qwen3", "mixtral", "llama"], default="qwen3")
    parser.add_argument("--shapes", nargs="+", default=["1x1", "16x1"], help="BATCHxTOKENS, as e2e_llama.py's")
    parser.add_argument("--peers", nargs="+", default=["bf16", "fxquant"])
    parser.add_argument("--list", action="store_true", help="each launch too")
    args = parser.parse_args()
    model = tiny_model(args.model)
    print(f"{args.model}, 1 layer, Triton kernels launched per forward (extern calls apart)")
    for shape in args.shapes:
        batch, tokens = (int(size) for size in shape.split("x"))
        for peer in args.peers:
            kernels, externs = launches(wrapper_source(model, peer, batch, tokens))
            print(f"  {shape:>7}  {peer:<48} {len(kernels):>3} kernels, {len(externs):>3} extern calls")
            if args.list:
                for name in kernels + externs:
                    print(f"      {name}")


if __name__ == "__main__":
    main()
