"""The `fxquant` command: quantize an HF model directory into a checkpoint, show a model's plan,
inspect a checkpoint.

    fxquant quantize DIR_IN DIR_OUT --scheme fp8_rowwise --skip lm_head
    fxquant plan DIR_IN --scheme int8
    fxquant inspect DIR_OUT            (or DIR_OUT/model.safetensors)

Models are read offline (local_files_only); a model whose config names a *ForCausalLM
architecture is loaded with AutoModelForCausalLM, any other with AutoModel.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from fxquant.checkpoint import (
    METADATA_FILE,
    WEIGHTS_FILE,
    empty_weights,
    plan_modules,
    read_header,
    read_metadata,
    save_quantized,
)
from fxquant.config import SCHEMES, QuantConfig
from fxquant.footprint import dtype_name, nbytes
from fxquant.hf_formats import HF_FORMATS


def _quant_config(args: argparse.Namespace) -> QuantConfig:
    options = {"scheme": args.scheme, "skip": args.skip, "activation_scale_ub": args.activation_scale_ub}
    return QuantConfig.from_options({key: value for key, value in options.items() if value is not None})


def _auto_class(config):
    """AutoModelForCausalLM for a *ForCausalLM architecture, else AutoModel."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    causal = any(name.endswith("ForCausalLM") for name in architectures)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def _bytes_line(before: int, after: int) -> str:
    return f"bytes: {before:,} before, {after:,} after ({after / before:.2f}x)"


def quantize(args: argparse.Namespace) -> None:
    import transformers
    from tqdm import tqdm  # a dependency of transformers

    config = _quant_config(args)
    hf_config = transformers.AutoConfig.from_pretrained(args.dir_in, local_files_only=True)
    model = _auto_class(hf_config).from_pretrained(args.dir_in, local_files_only=True).eval()
    metadata = save_quantized(
        model, args.dir_out, config, progress=lambda layers: tqdm(layers, desc="quantizing", unit="layer"),
        hf_format=args.hf_format,
    )
    quantized = sum(entry["scheme"] is not None for entry in metadata["plan"])
    print(f"{args.dir_out}: {config.scheme}, {quantized} of {len(metadata['plan'])} linear layers quantized")
    print(_bytes_line(metadata["bytes"]["before"], metadata["bytes"]["after"]))


def plan(args: argparse.Namespace) -> None:
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(args.dir_in, local_files_only=True)
    with empty_weights():  # the architecture only: no weights are read
        model = _auto_class(hf_config).from_config(hf_config)
    print(plan_modules(model, _quant_config(args)))


def inspect(args: argparse.Namespace) -> None:
    path = Path(args.path)
    weights, directory = (path / WEIGHTS_FILE, path) if path.is_dir() else (path, path.parent)
    header = read_header(weights)
    metadata = read_metadata(directory)[0] if (directory / METADATA_FILE).is_file() else None

    rows = [("tensor", "dtype", "shape")] + [
        (name, dtype_name(dtype), "x".join(map(str, shape)) or "scalar") for name, (dtype, shape) in header.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    print(f"checkpoint: {weights}")
    if metadata is None:
        print(f"scheme: unknown (no {METADATA_FILE})")
    else:
        plan = metadata["plan"]
        skipped = [entry["layer"] for entry in plan if entry["scheme"] is None]
        method = metadata.get("quantization_config", {}).get("quant_method")
        layout = {"fbgemm_fp8": " (HF transformers fbgemm_fp8 layout)", "compressed-tensors": " (compressed-tensors layout)"}.get(method, "")
        print(f"scheme: {metadata['config']['scheme']}{layout}")
        print(f"linear layers: {len(plan) - len(skipped)} quantized, {len(skipped)} left as they were {skipped}")
    dtypes = Counter(dtype_name(dtype) for dtype, _ in header.values())
    scales = sum(name.endswith(".weight_scale") or name == "weight_scale" for name in header)
    print(f"tensors: {len(header)} ({', '.join(f'{n} {d}' for d, n in dtypes.most_common())}); {scales} weight_scale")
    after = sum(nbytes(dtype, shape) for dtype, shape in header.values())
    if metadata is None:
        print(f"bytes: {after:,} stored (size before quantization unknown)")
    else:
        print(_bytes_line(metadata["bytes"]["before"], after))


def _parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--scheme", choices=SCHEMES, help="default: fp8_rowwise")
    options.add_argument("--skip", nargs="*", metavar="GLOB", help="layers left unquantized (fnmatch globs); default: lm_head")
    options.add_argument("--activation-scale-ub", type=float, help="FP8: upper bound on an activation amax")

    parser = argparse.ArgumentParser(prog="fxquant", description="Quantize models' linear layers to FP8 / int8 checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "quantize", parents=[options], help="quantize an HF model directory into a safetensors checkpoint",
        description="Load an HF model directory (offline), quantize its nn.Linear layers and write "
        f"{WEIGHTS_FILE} and {METADATA_FILE}, plus an HF config.json whose quantization_config is "
        "HF's fbgemm_fp8 (fp8_rowwise) or llm-compressor's compressed-tensors (fp8_rowwise, fp8_blockwise, int8).",
    )
    command.add_argument("dir_in")
    command.add_argument("dir_out")
    command.add_argument("--hf-format", choices=list(HF_FORMATS), default="fbgemm_fp8",
                         help="the quantization_config written into config.json (default: fbgemm_fp8)")
    command.set_defaults(run=quantize)
    command = commands.add_parser(
        "plan", parents=[options], help="the plan table of an HF model directory",
        description="Which nn.Linear layers `quantize` would quantize, and why the others are skipped. "
        "Walks the modules of the architecture built from config.json (on the meta device, no weights read), "
        "as `quantize` does; it does not trace the model, so matmuls outside nn.Linear are not listed.",
    )
    command.add_argument("dir_in")
    command.set_defaults(run=plan)
    command = commands.add_parser(
        "inspect", help="what a checkpoint holds",
        description=f"Tensors, dtypes and shapes of a checkpoint directory or {WEIGHTS_FILE}, its scheme "
        f"and plan (from {METADATA_FILE}), and bytes before/after; reads only the headers.",
    )
    command.add_argument("path", metavar="DIR_OR_FILE")
    command.set_defaults(run=inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with torch.no_grad():
            args.run(args)
    except (ValueError, OSError) as error:
        print(f"fxquant {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
