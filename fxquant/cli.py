"""The `fxquant` command: quantize an HF model directory into a checkpoint, show a model's plan,
inspect a checkpoint.

    fxquant quantize DIR_IN DIR_OUT --scheme fp8_rowwise --skip lm_head
    fxquant plan DIR_IN --scheme int8
    fxquant inspect DIR_OUT            (or DIR_OUT/model.safetensors)

Models are read offline (local_files_only), as the class config.json's `architectures` names
(fxquant/hf_model.py); the directories are checked before anything is read (fxquant/cli_paths.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError

from fxquant.checkpoint import (
    HF_CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    empty_weights,
    plan_modules,
    read_header,
    read_metadata,
    save_quantized,
)
from fxquant.bnb_checkpoints import QUANT_STATE, save_bitsandbytes
from fxquant.cli_paths import check_input_dir, check_output_dir
from fxquant.checkpoint_experts import plan_experts
from fxquant.shards import DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, parse_size
from fxquant.streaming_quantize import WEIGHT_SUFFIXES, NotStreamable, extra_files, streaming_plan, write_streamed
from fxquant.config import AUTO, QuantConfig, auto_scheme
from fxquant.footprint import dtype_name, nbytes
from fxquant.hf_formats import HF_FORMATS, NO_ACTIVATION_SCALE_UB, NoHFLayout, hf_quantization_config, not_converted
from fxquant.hf_model import (
    check_not_quantized,
    check_output_holds_input,
    load_model,
    model_class,
    read_config,
    tensor_names,
)
from fxquant.ops.blockwise_4bit import QUANT_TYPES
from fxquant.passes import Plan
from fxquant.scheme import SCHEMES

BITSANDBYTES = "bitsandbytes"  # --hf-format: bitsandbytes' own layout (fxquant/bnb_checkpoints.py), nf4 / fp4 only


def _skip_globs(values: list[str] | None) -> tuple[str, ...] | None:
    """`--skip a,b --skip c` → ("a", "b", "c"); `--skip ''` → () (quantize every layer); no flag → None."""
    return None if values is None else tuple(glob for value in values for glob in value.split(",") if glob)


def _quant_config(args: argparse.Namespace) -> QuantConfig:
    """The command's QuantConfig, "auto" resolved as checkpoints take it (printed by _auto_line)."""
    options = {"scheme": args.scheme, "skip": _skip_globs(args.skip), "activation_scale_ub": args.activation_scale_ub}
    return QuantConfig.from_options({key: value for key, value in options.items() if value is not None}).resolved()


def _auto_line(args: argparse.Namespace) -> str | None:
    """What `--scheme auto` (the default) chose for the checkpoint, and why; None for a scheme given by name."""
    if args.scheme not in (None, AUTO):
        return None
    scheme, why = auto_scheme(None)
    return f"scheme auto: {scheme} ({why}; --scheme int8 for CPU serving or GPUs older than sm_89)"


def _layout_problems(config: QuantConfig) -> list[str]:
    """Why each HF layout cannot describe `config`'s scheme and bound, for the line that says none was written."""
    problems = []
    for layout in HF_FORMATS.values():
        try:
            layout(Plan(), config)
        except NoHFLayout as error:
            problems.append(str(error).removeprefix("fxquant: "))
    return problems


def _bytes_line(before: int, after: int) -> str:
    return f"bytes: {before:,} before, {after:,} after ({after / before:.2f}x)"


def _reader_notes(metadata: dict) -> list[str]:
    """Where a reader of config.json's quantization_config (transformers, vLLM) computes otherwise than fxquant."""
    layout = metadata.get("quantization_config") or {}
    ub = metadata["config"].get("activation_scale_ub")
    notes = []
    if layout.get("quant_method") == "fbgemm_fp8" and layout.get("activation_scale_ub") != (NO_ACTIVATION_SCALE_UB if ub is None else ub):
        notes.append(
            f"note: config.json's activation_scale_ub is {layout.get('activation_scale_ub')}: transformers clamps activation "
            f"amax there, fxquant computed with {'no bound' if ub is None else ub}"
        )
    if layout.get("quant_method") == "compressed-tensors" and ub is not None:
        notes.append(f"note: compressed-tensors has no activation bound: its readers do not clamp activation amax at {ub} as fxquant did")
    return notes


def _progress_bar(total: int, args: argparse.Namespace, unit: str = "B"):
    """A progress bar (in bytes, or layers) on stderr; off with --quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc="quantizing", unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                disable=args.quiet or not sys.stderr.isatty(), file=sys.stderr)


def _quantize_whole(args: argparse.Namespace, dir_in: Path, dir_out: Path, cls: type, hf_config, config: QuantConfig) -> dict:
    """The model loaded whole by transformers, then saved: for inputs streaming cannot read by name."""
    inputs = tensor_names(dir_in)  # reads the weight files' headers: a damaged file is named here
    model = load_model(dir_in, cls, hf_config)
    with _progress_bar(len(plan_modules(model, config).rewritten), args, unit="layer") as bar:
        def progress(layers):
            for layer in layers:
                yield layer
                bar.update(1)

        metadata = save_quantized(
            model, dir_out, config, progress=progress, hf_format=args.hf_format, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size, extra_files=extra_files(dir_in),
        )
    check_output_holds_input(inputs, dir_in, dir_out, model, metadata["tensors"], metadata["tied"])
    return metadata


def _quantized_count(plan: list[dict]) -> str:
    """"6 of 8 linear layers" (and "4 of 4 expert weights" for a MoE model)."""
    experts = [entry for entry in plan if "experts" in entry]
    linears = [entry for entry in plan if "experts" not in entry]
    count = f"{sum(entry['scheme'] is not None for entry in linears)} of {len(linears)} linear layers"
    if experts:
        count += f" and {sum(entry['scheme'] is not None for entry in experts)} of {len(experts)} expert weights"
    return count


def _weights_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.name.endswith(WEIGHT_SUFFIXES))


def _model_to_quantize(dir_in: Path, config: QuantConfig) -> tuple[object, type]:
    """The input's HF config and model class, once it is known not to be quantized already and to have
    layers `config` quantizes (refused otherwise, before anything is written)."""
    check_not_quantized(dir_in)
    hf_config = read_config(dir_in)
    cls, note = model_class(hf_config)
    if note:
        print(f"note: {note}")
    _refuse_if_nothing_quantizes(dir_in, _checkpoint_plan(cls, hf_config, config), config)
    return hf_config, cls


def _quantize_bitsandbytes(dir_in: Path, dir_out: Path, config: QuantConfig) -> None:
    """--hf-format bitsandbytes: nf4 / fp4 in bitsandbytes' serialized layout, which transformers loads
    with bitsandbytes (`load_in_4bit`; fxquant/bnb_checkpoints.py). The model is loaded whole (the
    layout is transformers', not fxquant's streamed one) and written as one weights file."""
    if config.scheme not in QUANT_TYPES:
        raise ValueError(f"fxquant: --hf-format bitsandbytes holds nf4 or fp4 layers, not {config.scheme}; "
                         "pass --scheme nf4 or --scheme fp4")
    if dir_out.exists():
        raise ValueError(f"fxquant: {dir_out} exists; --hf-format bitsandbytes writes a new directory (--overwrite "
                         "does not apply to it)")
    check_output_dir(dir_in, dir_out, overwrite=False)
    hf_config, cls = _model_to_quantize(dir_in, config)
    model = load_model(dir_in, cls, hf_config)
    written = save_bitsandbytes(model, dir_out, config, extra_files=extra_files(dir_in))
    quantized = sum(name.endswith(f".{QUANT_STATE}{config.scheme}") for name in read_header(dir_out / WEIGHTS_FILE))
    print(f"{dir_out}: {cls.__name__}, {config.scheme}, {quantized} linear layers quantized; "
          f"left as they were: {written['llm_int8_skip_modules']}")
    patterns = plan_modules(model, config).float32_modules
    float32 = [name for name in written["llm_int8_skip_modules"] if not_converted(name, patterns)]
    if float32:
        print(f"{len(float32)} layers stay float: transformers keeps them in float32 "
              f"({cls.__name__}._keep_in_fp32_modules {list(patterns)})")
    experts = plan_experts(model, config)
    if experts:  # bitsandbytes' layout holds nn.Linear layers only
        notes = sorted({entry.note for entry in experts})
        print(f"{len(experts)} expert weights left as they were: {'; '.join(notes)}")
    print(_bytes_line(_weights_bytes(dir_in), _weights_bytes(dir_out)))
    print(f"{HF_CONFIG_FILE}: quantization_config bitsandbytes (load_in_4bit, {written['bnb_4bit_quant_type']}), "
          "for transformers with bitsandbytes; fxquant.load_bitsandbytes reads it back")


def quantize(args: argparse.Namespace) -> None:
    dir_in, dir_out = Path(args.dir_in), Path(args.dir_out)
    config = _quant_config(args)
    if args.hf_format == BITSANDBYTES:
        return _quantize_bitsandbytes(dir_in, dir_out, config)
    try:  # a layout that cannot describe the scheme is refused before anything is read
        hf_quantization_config(args.hf_format, Plan(), config)
    except NoHFLayout as error:
        raise ValueError(f"fxquant: --hf-format {args.hf_format}: {str(error).removeprefix('fxquant: ')}; use --hf-format auto") from error
    parse_size(args.max_shard_size)
    if args.workers < 1:
        raise ValueError(f"fxquant: --workers must be at least 1, got {args.workers}")
    check_output_dir(dir_in, dir_out, args.overwrite)  # before anything is read
    hf_config, cls = _model_to_quantize(dir_in, config)
    try:
        streaming = streaming_plan(dir_in, cls, hf_config, config)
    except NotStreamable as why:
        print(f"note: {dir_in} is loaded whole, not streamed: {why}")
        metadata = _quantize_whole(args, dir_in, dir_out, cls, hf_config, config)
    else:
        with _progress_bar(streaming.input_bytes, args) as bar:
            metadata = write_streamed(
                streaming, dir_out, hf_config, cls.__name__, args.hf_format, overwrite=args.overwrite,
                max_shard_size=args.max_shard_size, workers=args.workers, advance=bar.update,
            )
    if _auto_line(args):
        print(_auto_line(args))
    print(f"{dir_out}: {cls.__name__}, {config.scheme}, {_quantized_count(metadata['plan'])} quantized")
    print(_bytes_line(metadata["bytes"]["before"], metadata["bytes"]["after"]))
    shards = len(metadata["sha256"])
    print(f"weights: {shards} file{'s' * (shards > 1)}{f' and {INDEX_FILE}' if shards > 1 else ''}")
    written = (metadata.get("quantization_config") or {}).get("quant_method")
    if written:
        print(f"{HF_CONFIG_FILE}: quantization_config {written}, for transformers and vLLM")
    else:
        why = "; ".join(_layout_problems(config)) or "transformers converts nn.Linear only, not the quantized Conv1D layers"
        hint = f" (--hf-format {BITSANDBYTES} writes a layout it loads)" if config.scheme in QUANT_TYPES else ""
        print(f"{HF_CONFIG_FILE}: none written: {why}; transformers cannot load {dir_out}{hint}, fxquant.load_quantized can")
    for line in _reader_notes(metadata):
        print(line)


def _checkpoint_plan(cls: type, hf_config, config: QuantConfig) -> Plan:
    """What a checkpoint of `cls` gets under `config`: its linear layers, then a MoE model's expert
    weights as checkpoints store them; the architecture only, no weights read."""
    with empty_weights():
        model = cls(hf_config)
    layers = plan_modules(model, config)
    layers.extend(plan_experts(model, config))
    return layers


def _refuse_if_nothing_quantizes(dir_in: Path, layers: Plan, config: QuantConfig) -> None:
    """A checkpoint in which the scheme quantizes no layer would be the input under a quantization
    config: refused before anything is written, with the commonest reasons."""
    if layers.rewritten:
        return
    reasons = Counter(entry.note for entry in layers)
    said = "; ".join(f"{note} ({count} layer{'s' * (count > 1)})" for note, count in reasons.most_common(3))
    raise ValueError(f"fxquant: {dir_in}: {config.scheme} quantizes none of its {len(layers)} layers ({said}); nothing written. "
                     "`fxquant plan` gives each layer's reason")


def plan(args: argparse.Namespace) -> None:
    dir_in = Path(args.dir_in)
    check_input_dir(dir_in)
    hf_config = read_config(dir_in)
    cls, note = model_class(hf_config)
    if note:
        print(f"note: {note}")
    config = _quant_config(args)
    if _auto_line(args):
        print(_auto_line(args))
    print(_checkpoint_plan(cls, hf_config, config))


def _metadata_lines(metadata: dict, path: Path) -> tuple[list[str], int]:
    """inspect's lines about the scheme and the plan, and the bytes before quantization; a
    malformed fxquant.json is an error naming it."""
    try:
        skipped = [entry["layer"] for entry in metadata["plan"] if entry["scheme"] is None]
        method = (metadata.get("quantization_config") or {}).get("quant_method")
        layout = {"fbgemm_fp8": " (HF transformers fbgemm_fp8 layout)", "compressed-tensors": " (compressed-tensors layout)"}.get(method, "")
        schemes = Counter(entry["scheme"] for entry in metadata["plan"] if entry["scheme"] is not None)
        lines = [
            f"scheme: {(next(iter(schemes)) if schemes else metadata['config']['scheme'])}{layout}" if len(schemes) <= 1
            else "schemes: " + ", ".join(f"{scheme} ({count} layer{'s' * (count > 1)})" for scheme, count in schemes.items()),
            *_reader_notes(metadata),
            f"{_quantized_count(metadata['plan'])} quantized; left as they were: {skipped}",
        ]
        return lines, int(metadata["bytes"]["before"])
    except KeyError as error:
        raise ValueError(f"fxquant: {path}: missing {error}") from error
    except (TypeError, AttributeError, ValueError) as error:
        raise ValueError(f"fxquant: {path}: malformed ({error})") from error


def _hf_config_lines(directory: Path, header: dict) -> list[str]:
    """inspect's line for a checkpoint without fxquant.json whose config.json names a quantization
    (transformers' save_pretrained of a quantized model, save_bitsandbytes): its quant_method, and for
    bitsandbytes' layout the 4-bit layers the files hold."""
    path = directory / HF_CONFIG_FILE
    try:
        quantization_config = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"fxquant: {path}: malformed ({error})") from error
    if not quantization_config:
        return []
    method = quantization_config.get("quant_method")
    if method == BITSANDBYTES:
        layers = sum(f".{QUANT_STATE}" in name for name in header)
        kind = quantization_config.get("bnb_4bit_quant_type") if quantization_config.get("load_in_4bit") else "LLM.int8"
        return [f"{HF_CONFIG_FILE}: quantization_config bitsandbytes ({kind}): {layers} 4-bit layers "
                "(fxquant.load_bitsandbytes runs them)"]
    return [f"{HF_CONFIG_FILE}: quantization_config {method} (fxquant.load_quantized reads fbgemm_fp8, "
            "compressed-tensors and finegrained_fp8 checkpoints)"]


def _weights_files(directory: Path, metadata: dict | None) -> list[str]:
    """The weights files of a checkpoint directory: fxquant.json's, else the index's, else model.safetensors."""
    if metadata is not None:
        return list(metadata["sha256"])
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"fxquant: {index}: no weight_map")
        return sorted(set(weight_map.values()))
    return [WEIGHTS_FILE]


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) if cell[:1].isdigit() and i else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))).rstrip())


def _layer_rows(metadata: dict) -> list[tuple[str, ...]]:
    """inspect's per-layer table: layer, scheme, bytes before and after, and why a layer was left as it
    was (fxquant.json's plan)."""
    rows = [("layer", "scheme", "bytes before", "bytes after", "", "note")]
    for entry in metadata["plan"]:
        before, after = entry["bytes"]["before"], entry["bytes"]["after"]
        note = entry.get("note", "") if entry["scheme"] is None else ""
        rows.append((entry["layer"], entry["scheme"] or "-", f"{before:,}", f"{after:,}", f"{after / before:.2f}x" if before else "", note))
    return rows


def inspect(args: argparse.Namespace) -> None:
    path = Path(args.path)
    if not path.exists():
        raise ValueError(f"fxquant: {path}: no such file or directory")
    directory = path if path.is_dir() else path.parent
    metadata = read_metadata(directory)[0] if (directory / METADATA_FILE).is_file() else None
    files = _weights_files(directory, metadata) if path.is_dir() else [path.name]
    headers = {file: read_header(directory / file) for file in files}
    header = {name: spec for part in headers.values() for name, spec in part.items()}
    sharded = len(files) > 1
    rows = [("tensor", "dtype", "shape", *(["file"] if sharded else []))] + [
        (name, dtype_name(dtype), "x".join(map(str, shape)) or "scalar", *([file] if sharded else []))
        for file, part in headers.items() for name, (dtype, shape) in part.items()
    ]
    _table(rows)
    print()
    if metadata is not None and path.is_dir() and all("bytes" in entry for entry in metadata["plan"]):
        _table(_layer_rows(metadata))
        print()
    print(f"checkpoint: {directory / files[0]}" if not sharded else f"checkpoint: {directory} ({len(files)} shards, {INDEX_FILE})")
    whole = path.is_dir() or metadata is None or files == list(metadata["sha256"])  # else one shard of several
    if metadata is None:
        lines, before = [f"scheme: unknown (no {METADATA_FILE})", *_hf_config_lines(directory, header)], None
    else:
        lines, before = _metadata_lines(metadata, directory / METADATA_FILE)
    for line in lines:
        print(line)
    dtypes = Counter(dtype_name(dtype) for dtype, _ in header.values())
    scales = sum(name.endswith(".weight_scale") or name == "weight_scale" for name in header)
    print(f"tensors: {len(header)} ({', '.join(f'{n} {d}' for d, n in dtypes.most_common())}); {scales} weight_scale")
    after = sum(nbytes(dtype, shape) for dtype, shape in header.values())
    if before and whole:
        print(_bytes_line(before, after))
    else:
        print(f"bytes: {after:,} stored{' (size before quantization unknown)' if whole else f' in {path.name}'}")


def _parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--scheme", choices=[AUTO, *SCHEMES],
                         help="default: auto, which is fp8_rowwise in a checkpoint (the plan says why)")
    options.add_argument(
        "--skip", action="append", metavar="GLOB[,GLOB...]",
        help="layers left unquantized (fnmatch globs), repeatable; --skip '' quantizes every layer; default: lm_head",
    )
    options.add_argument("--activation-scale-ub", type=float, help="FP8: upper bound on an activation amax")

    parser = argparse.ArgumentParser(prog="fxquant", description="Quantize models' linear layers to FP8 / int8 checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "quantize", parents=[options], help="quantize an HF model directory into a safetensors checkpoint",
        description="Quantize the nn.Linear layers of an HF model directory (offline; the class its config.json names, "
        "built on the meta device) tensor by tensor: each weight is read from the safetensors files, quantized and "
        f"written, so memory holds a few tensors, never the model. Writes {WEIGHTS_FILE} (or shards and {INDEX_FILE}), "
        f"{METADATA_FILE}, an HF {HF_CONFIG_FILE} whose quantization_config is HF's fbgemm_fp8 (fp8_rowwise) or "
        "llm-compressor's compressed-tensors (fp8_rowwise, fp8_blockwise, int8), and copies of the input's other "
        "files (tokenizer, generation config, ...). An input whose files transformers renames on loading, or in "
        "pickle files, is loaded whole instead. DIR_OUT must not be, hold or lie inside DIR_IN, nor share a file with it.",
    )
    command.add_argument("dir_in")
    command.add_argument("dir_out")
    command.add_argument(
        "--hf-format", choices=["auto", *HF_FORMATS, BITSANDBYTES], default="auto",
        help="the quantization_config written into config.json; auto (the default): fbgemm_fp8 for fp8_rowwise, "
        "compressed-tensors for fp8_blockwise and int8, none for fp8_tensorwise, nf4 and fp4; bitsandbytes: "
        "nf4 / fp4 in bitsandbytes' own layout, which transformers loads with bitsandbytes (the model is loaded "
        "whole, not streamed; one weights file)",
    )
    command.add_argument(
        "--overwrite", action="store_true", help="replace DIR_OUT even if it is not empty and not an fxquant checkpoint"
    )
    command.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
        help=f"largest weights file, bytes or e.g. 5GB, 500MB (default {DEFAULT_MAX_SHARD_SIZE}, as transformers' save_pretrained)",
    )
    command.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="tensors read, quantized and written at once, by threads (default 1); memory holds about N tensors",
    )
    command.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
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


# Errors of bad input (a missing or malformed file, a model that does not fit): one line, no traceback.
BAD_INPUT = (ValueError, OSError, SafetensorError, pickle.UnpicklingError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with torch.no_grad():
            args.run(args)
        sys.stdout.flush()  # a reader that left (`| head`) is noticed here, not at exit
    except BrokenPipeError:
        # As Python's docs advise (signal, "Note on SIGPIPE"): point stdout at devnull so that the
        # flush at exit does not fail again, and exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except BAD_INPUT as error:
        print(f"fxquant {args.command}: error: {str(error).removeprefix('fxquant: ')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # files are written to a temporary name and renamed whole: nothing half-written stays
        print(f"fxquant {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
