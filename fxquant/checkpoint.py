"""Quantized checkpoints as safetensors (never pickle), in fxquant's layout, which for fp8_rowwise
is also HF transformers' `fbgemm_fp8` layout.

A checkpoint is a directory (docs/design.md, "Checkpoint layout"):
    model.safetensors   the model's state dict, where each quantized nn.Linear holds its scheme's
      (or shards +      tensors: `<layer>.weight` (e4m3 or int8, [N, K]) and, for the built-ins,
       index)           `<layer>.weight_scale` (float32: [N, 1] per channel, [N/bn, K/bk] per
                        block, [] per tensor); a plugin's `<layer>.weight_<...>` as it declares;
                        a MoE model's expert weights one tensor per expert under HF's names
                        (fxquant/checkpoint_experts.py); more than `max_shard_size` bytes: shards as transformers' save_pretrained
                        writes them (fxquant/shards.py)
    fxquant.json        format version, QuantConfig, plan (each layer's scheme: the declaration
                        load_quantized registers, never guessed), each tensor's dtype and shape, tied
                        names, bytes before/after (per layer too), each weights file's SHA-256, the files the
                        save wrote, and the quantization_config of config.json
    config.json         HF models only: the model's config plus a quantization_config that
                        transformers understands: {"quant_method": "fbgemm_fp8", ...} for
                        fp8_rowwise, or llm-compressor's compressed-tensors config (fp8_rowwise,
                        fp8_blockwise, int8, and mixes of them by layer; what vLLM loads);
                        hf_format="auto" (the default) picks the first that describes the
                        schemes. Otherwise none: transformers would cast the weights to float and
                        load garbage.

`load_quantized` checks the whole checkpoint against the model before it changes anything, then
assigns the stored tensors (no copy into the float parameters), so a model created under
`empty_weights()` is loaded without ever holding its float weights; `torch.compile(model,
backend="fxquant")` then runs the stored weights as they are (passes/stored_weights.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from torch import Tensor, nn
from torch.export import ExportedProgram

from fxquant import checkpoint_experts
from fxquant.checkpoint_dir import check_replaceable, replaced_atomically
from fxquant.checkpoint_layers import file_tensors, is_conv1d, plan_modules, planned_shape, stored_layout, traced_storage
from fxquant.checkpoint_load import load_quantized  # noqa: F401  (fxquant.checkpoint.load_quantized, as before)
from fxquant.checkpoint_metadata import (  # noqa: F401  (their names here, as before)
    FORMAT_VERSION, HF_CONFIG_FILE, METADATA_FILE, check_config, read_header, read_metadata, tensor_key,
)
from fxquant.checkpoint_writer import Piece, file_sha256, write_weights  # noqa: F401
from fxquant.config import QuantConfig
from fxquant.empty_weights import empty_weights  # noqa: F401  (fxquant.checkpoint.empty_weights, as before)
from fxquant.footprint import dtype_name, memory_footprint, nbytes, tied_names
from fxquant.hf_formats import check_hf_format, hf_quantization_config
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.passes.quantize_weights import quantize_parameter
from fxquant.passes.stored_weights import is_stored
from fxquant.scheme import get_scheme
from fxquant.shards import DEFAULT_MAX_SHARD_SIZE, WEIGHTS_FILE, parse_size  # noqa: F401  (WEIGHTS_FILE: its name here, as before)

Progress = Callable[[list[PlannedLinear]], Iterable[PlannedLinear]]


def quantize_state(
    model: nn.Module, config: QuantConfig | None = None, progress: Progress | None = None
) -> tuple[dict[str, Tensor], Plan]:
    """The tensors of `model`'s quantized checkpoint, and the plan that chose its layers.

    Each quantized layer's `weight` becomes its low-precision copy and the layer gains its scheme's
    other tensors (`weight_scale`, ...), in the file's layout (fxquant/checkpoint_layers.py), listed
    after its weight; a layer already stored quantized (a model from `load_quantized`) is written as
    stored, bit for bit; every other tensor of the state dict is kept as is, in its order.
    `progress` wraps the list of layers being quantized (e.g. with tqdm).
    """
    config = config or QuantConfig()
    check_config(config)
    state = model.state_dict()
    on_meta = [name for name, t in state.items() if t.is_meta]
    if on_meta:
        raise ValueError(
            f"fxquant: cannot quantize weights on the meta device ({', '.join(on_meta[:5])}); load the model's weights first"
        )
    plan = plan_modules(model, config)
    plan.extend(checkpoint_experts.plan_experts(model, config))
    held = next((entry for entry in plan.skipped if is_stored(entry.site.weight)), None)
    if held is not None:  # written as it is, its codes would be read as float weights
        raise ValueError(
            f"fxquant: {held.layer} is held quantized ({held.site.weight.dtype}) and a checkpoint cannot store it so "
            f"({held.note}); save the model before quantize_, or quantize its float checkpoint with `fxquant quantize`"
        )
    replaced: dict[str, dict[str, Tensor]] = {}  # a layer's weight name → the layer's tensors, by name
    for entry in (progress or iter)(plan.rewritten):
        expert = getattr(entry, "expert", None)
        if expert is not None:  # one tensor per expert and part (fxquant/checkpoint_experts.py)
            if entry.stored is not None:  # as loaded: the op's layout, held as buffers the files do not hold
                tensors = {"weight": entry.site.weight.detach(), **entry.stored}
                for attr in entry.stored:
                    del state[tensor_key(expert.module, expert.stored_attr(attr))]
            else:
                tensors = quantize_parameter(entry.layer, entry.site.weight, False, entry.scheme, entry.options)
            replaced[entry.layer] = checkpoint_experts.file_tensors(expert, entry.scheme, tensors)
            continue
        site, module = entry.site, model.get_submodule(entry.layer)
        if entry.stored is not None:  # as loaded: the op's weight, the other tensors as the file held them
            layout = stored_layout(entry.scheme, *planned_shape(entry), entry.options, False)
            quantized = {"weight": site.weight.detach(), **{name: t.reshape(layout[name][1]) for name, t in entry.stored.items()}}
        else:
            quantized = quantize_parameter(entry.layer, site.weight, site.weight_is_kn, entry.scheme, entry.options)
        files = file_tensors(entry.scheme, quantized, is_conv1d(module))
        replaced[tensor_key(entry.layer, "weight")] = {tensor_key(entry.layer, name): t for name, t in files.items()}
    return ordered_state(state, replaced), plan


def ordered_state(state: dict[str, object], replaced: dict[str, dict[str, object]]) -> dict[str, object]:
    """A checkpoint's tensors: the state dict's, each quantized weight replaced by its layer's tensors
    (weight first); shared by save_quantized and the streaming quantizer."""
    ordered: dict[str, object] = {}
    inserted = {name for tensors in replaced.values() for name in tensors}
    for name, value in state.items():
        if name in replaced:
            ordered.update(replaced[name])
        elif name not in inserted:
            ordered[name] = value
    return ordered


def plan_rows(plan: Plan, layer_bytes: dict[str, tuple[int, int]]) -> list[dict]:
    """fxquant.json's plan: each layer's [N, K], scheme, note and bytes before/after (its weight, and
    what the checkpoint stores for it)."""
    rows = []
    for e in plan:
        before, after = layer_bytes[e.layer]
        rows.append({"layer": e.layer, "shape": list(planned_shape(e)), "scheme": e.scheme,
                     "note": e.note, "bytes": {"before": before, "after": after}})
        if e.site.kind != "linear":  # an expert weight: E; stored per expert, each part's name, "{e}" for the expert
            rows[-1]["experts"] = e.site.experts
            if e.scheme is not None and getattr(e, "expert", None) is not None:
                rows[-1]["expert_names"] = list(e.expert.parts)
    return rows


def layer_bytes(plan: Plan, state: dict[str, object], stored: dict[str, tuple]) -> dict[str, tuple[int, int]]:
    """{layer: (bytes of its weight in `state`, bytes of its tensors in `stored` ({name: (dtype, shape)}))}."""
    sizes = {}
    for e in plan:
        weight = e.site.weight_name if e.site.weight_name in state else tensor_key(e.layer, "weight")
        before = nbytes(state[weight].dtype, state[weight].shape) if weight in state else 0
        expert = getattr(e, "expert", None)
        if e.scheme and expert is not None:
            names = [name for attr in get_scheme(e.scheme).tensors for name in expert.file_names(attr)]
        else:
            names = [tensor_key(e.layer, attr) for attr in get_scheme(e.scheme).tensors] if e.scheme else [weight]
        after = sum(nbytes(*stored[name]) for name in names if name in stored)
        sizes[e.layer] = (before, after if e.scheme else before)
    return sizes


def program_state(program: ExportedProgram) -> tuple[dict[str, Tensor], Plan, QuantConfig, int]:
    """The checkpoint tensors of a program made by `fxquant.export`, as `quantize_state` would give
    them for its model, with its plan, its config and the bytes of the float state it came from."""
    plan, config = getattr(program, "fxquant_plan", None), getattr(program, "fxquant_config", None)
    if plan is None or config is None:
        raise ValueError(
            "fxquant: save_quantized takes an ExportedProgram made by fxquant.export in this process (the plan "
            "does not survive torch.export.save/load); save the model instead, or the program with torch.export.save"
        )
    check_config(config)
    made = [entry for entry in plan.rewritten if entry.quantized is not None]  # not the stored weights
    lifted = {attr for entry in made for attr in entry.quantized.attrs.values()}
    tensors = {name: t for name, t in program.state_dict.items() if name not in lifted}
    before = memory_footprint(tensors)
    for entry in made:
        conv1d = traced_storage(entry.layer, entry.site)
        for name, tensor in file_tensors(entry.scheme, entry.quantized.tensors, conv1d).items():
            tensors[tensor_key(entry.layer, name)] = tensor
        before += entry.site.weight.numel() * entry.site.weight.element_size()
    return tensors, plan, config, before


def _write_json(path: Path, content: dict) -> None:
    """A new file (never an existing one, nor a symlink's target) holding `content` as JSON."""
    with open(path, "x") as file:
        file.write(json.dumps(content, indent=2, allow_nan=False) + "\n")


def copy_files(sources: list[Path], staging: Path) -> list[str]:
    """Copy files and directories (their contents, links followed) into `staging`; their names."""
    for source in sources:
        if source.is_dir():
            shutil.copytree(source, staging / source.name, symlinks=False)
        else:
            shutil.copyfile(source, staging / source.name)
    return [source.name for source in sources]


def write_checkpoint(
    directory: Path, pieces: list[Piece], *, config: QuantConfig, plan: list[dict], tied: dict[str, str], before: int,
    quantization_config: dict | None, hf_config: dict | None, extra_files: list[Path] = (), overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, workers: int = 1, advance: Callable[[int], object] | None = None,
) -> dict:
    """Write a checkpoint directory, replaced whole in one step (fxquant/checkpoint_dir.py): the
    weights files of `pieces` (fxquant/checkpoint_writer.py), config.json (`hf_config`), copies of
    `extra_files` and fxquant.json, which lists them all; returns what fxquant.json holds."""
    with replaced_atomically(directory, METADATA_FILE, overwrite) as staging:
        written = write_weights(staging, pieces, max_shard_size, workers, advance)
        layout = {name: spec for piece in pieces for name, spec in piece.layout.items()}
        metadata = {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(config),
            "plan": plan,
            "tensors": {name: {"dtype": dtype_name(dtype), "shape": list(shape), "file": written.file_of[name]}
                        for name, (dtype, shape) in layout.items()},
            "tied": tied,
            "bytes": {"before": before, "after": sum(nbytes(*spec) for spec in layout.values())},
            "sha256": written.sha256,
        }
        copied = copy_files(list(extra_files), staging)
        metadata["files"] = [*written.sha256, *([written.index] if written.index else []),
                             *([HF_CONFIG_FILE] if hf_config else []), *copied, METADATA_FILE]
        if quantization_config is not None:
            metadata["quantization_config"] = quantization_config
        if hf_config is not None:
            _write_json(staging / HF_CONFIG_FILE, hf_config)
        _write_json(staging / METADATA_FILE, metadata)
    return metadata


def hf_model_config(model_config: object, architecture: str, quantization_config: dict | None) -> dict | None:
    """config.json of an HF model's checkpoint: its config with `architectures` and the quantization_config."""
    if quantization_config is None or not hasattr(model_config, "to_dict"):
        return None
    return {**model_config.to_dict(), "architectures": [architecture], "quantization_config": quantization_config}


def save_quantized(
    model: nn.Module | ExportedProgram,
    directory: str | Path,
    config: QuantConfig | None = None,
    progress: Progress | None = None,
    hf_format: str | None = "auto",
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    extra_files: Iterable[str | Path] = (),
) -> dict:
    """Write a checkpoint of `model`, quantized, into `directory` (see the module docstring); the
    model is not modified. A program made by `fxquant.export` is written with the weights and the
    config it was quantized with (`config` must then be None), and without an HF config.json (it
    has no HF config). `hf_format` chooses the quantization_config written for HF models:
    "fbgemm_fp8", "compressed-tensors", "auto" (the first of these that describes the scheme and
    every quantized layer) or None (no config.json). `max_shard_size` (bytes, or "5GB", "500MB")
    splits the weights into shards as transformers' save_pretrained does, its default included.
    `extra_files` are copied in (the command line's tokenizer files, README, ...).
    Returns what fxquant.json holds, including the bytes of the float state dict before and of the
    stored tensors after quantization, in total and per layer.

    The directory is replaced whole, in one step (fxquant/checkpoint_dir.py): a save that fails
    leaves the earlier checkpoint as it was, and no file of an earlier save survives. It must be
    missing, empty or a checkpoint holding only the files its fxquant.json lists; anything else is
    refused unless `overwrite`, which replaces it and all it holds."""
    check_hf_format(hf_format)  # before any work
    parse_size(max_shard_size)
    check_replaceable(Path(directory), METADATA_FILE, overwrite)  # before the work of quantizing
    if isinstance(model, ExportedProgram):
        if config is not None:
            raise ValueError("fxquant: a program is saved with the config fxquant.export quantized it with; pass config=None")
        quantized, plan, config, before = program_state(model)
        state = {e.site.weight_name: e.site.weight for e in plan}
        config = config.resolved(next((e.site.weight.device for e in plan), None))  # "auto" as it was planned
    else:
        config = (config or QuantConfig()).resolved()  # "auto" as checkpoints take it (config.auto_scheme)
        quantized, plan = quantize_state(model, config, progress)
        state = model.state_dict()
        before = memory_footprint(state)
    tied = tied_names(quantized)  # stored once; safetensors refuses shared memory
    tensors = {name: t for name, t in quantized.items() if name not in tied}
    pieces = [Piece({name: (t.dtype, tuple(t.shape))}, lambda name=name, t=t: {name: t}) for name, t in tensors.items()]
    quantization_config = hf_quantization_config(hf_format, plan, config)
    hf_config = hf_model_config(getattr(model, "config", None), type(model).__name__, quantization_config)
    stored = {name: (t.dtype, tuple(t.shape)) for name, t in quantized.items()}
    return write_checkpoint(
        Path(os.path.abspath(directory)), pieces, config=config, plan=plan_rows(plan, layer_bytes(plan, state, stored)),
        tied=tied, before=before, quantization_config=quantization_config, hf_config=hf_config, overwrite=overwrite,
        max_shard_size=max_shard_size, extra_files=[Path(path) for path in extra_files],
    )
