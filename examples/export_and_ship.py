"""Quantize once, ship the result: torch.export → save → load → AOTInductor package.

    python examples/export_and_ship.py [--scheme int8] [--out /tmp/fxquant_ship]

Exports a small Llama-style model with its linear layers quantized, saves the program, loads it
back (only `import fxquant` is needed for its ops), compiles it ahead of time with AOTInductor
and checks that all three compute the same logits. Prints the plan and the sizes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxquant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", choices=fxquant.SCHEMES, default="fp8_rowwise")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="fxquant_ship_")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(device)
    ids = torch.randint(0, config.vocab_size, (1, 32), device=device)

    program = fxquant.export(model, (ids,), kwargs={"use_cache": False}, config=fxquant.QuantConfig(scheme=args.scheme))
    print(program.fxquant_plan, "\n")
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    program_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    print(f"state: {float_bytes / 2**20:.1f} MiB float -> {program_bytes / 2**20:.1f} MiB in the program")

    path = args.out / "model.pt2"
    torch.export.save(program, path)
    loaded = fxquant.load_program(path)
    package = torch._inductor.aoti_compile_and_package(loaded, package_path=str(args.out / "model_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)

    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        from_program = loaded.module()(ids, use_cache=False).logits
        from_package = runner(ids, use_cache=False).logits
    error = ((from_program - reference).norm() / reference.norm()).item()
    print(f"saved program: {path} ({path.stat().st_size / 2**20:.1f} MiB); AOTInductor package: {package}")
    print(f"logits vs float model: relative error {error:.4f}")
    print(f"package vs program: max |diff| {(from_package - from_program).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
