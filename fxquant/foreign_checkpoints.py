"""FP8 checkpoints others made, read without an fxquant.json: what their config.json's
quantization_config declares, in fxquant.json's terms (plan, tensor table, tied names, config), so
that `load_quantized` checks and loads them as it does its own.

    HF transformers "fbgemm_fp8"               every nn.Linear but modules_to_not_convert → fp8_rowwise
        (weight e4m3 [N, K], weight_scale float32 [N, 1]; activation_scale_ub → fp8_rowwise's; FbgemmFp8Config's
        float32-max bound, which clamps nothing, → None)
    llm-compressor "compressed-tensors"        each nn.Linear a config group targets (exact name, then
        (format float-quantized, naive-quantized,  "re:" regex, then class name, as compressed-tensors
         int-quantized, or mixed-precision        matches) and `ignore` does not:
         with those per group)                     weights float 8-bit symmetric, strategy
                                                     "channel" + input_activations dynamic "token"  → fp8_rowwise
                                                     "block" [bn, bk] + dynamic "group" of bk       → fp8_blockwise (bn, bk)
                                                     "tensor" + dynamic "tensor"                    → fp8_tensorwise (dynamic)
                                                   weights int 8-bit symmetric "channel" + dynamic "token" → int8
A scale stored in a narrower float (bf16, fp16) or shape ([1] for one per tensor) is widened and
reshaped on loading, exactly. Anything fxquant cannot run exactly is refused with the layer and the
field: static activation scales (input_scale), weight-only quantization, asymmetric or other bit
widths, other strategies and formats, quantized KV caches, sparsity, transforms.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from fxquant.checkpoint_metadata import HF_CONFIG_FILE, METADATA_FILE, read_header, tensor_key
from fxquant.config import QuantConfig
from fxquant.footprint import dtype_name
from fxquant.hf_formats import NO_ACTIVATION_SCALE_UB
from fxquant.scheme import get_scheme
from fxquant.shards import INDEX_FILE, WEIGHTS_FILE

SCALE_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class Unsupported(ValueError):
    """A group or config field fxquant cannot run exactly (its message names the field)."""


def _weights_map(directory: Path) -> dict[str, str]:
    """{tensor: file} of an HF checkpoint: its safetensors index, or model.safetensors."""
    if (directory / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text()).get("weight_map")
        except (ValueError, AttributeError) as error:
            raise ValueError(f"fxquant: {directory / INDEX_FILE}: not a JSON index ({error})") from error
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"fxquant: {directory / INDEX_FILE}: no weight_map of tensor names to files")
        return weight_map
    if (directory / WEIGHTS_FILE).is_file():
        return dict.fromkeys(read_header(directory / WEIGHTS_FILE), WEIGHTS_FILE)
    raise ValueError(f"fxquant: {directory}: no {WEIGHTS_FILE} nor {INDEX_FILE} (fxquant reads safetensors checkpoints only)")


def _not_converted(name: str, patterns: list[str]) -> bool:
    """transformers' should_convert_module, negated: a pattern matches from the start up to a module
    boundary, as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in patterns)


def _fbgemm_layers(model: nn.Module, quantization_config: dict) -> tuple[dict[str, str], dict]:
    """{layer: "fp8_rowwise"} for every nn.Linear transformers' fbgemm_fp8 converts, and the options."""
    patterns = quantization_config.get("modules_to_not_convert")
    if patterns is None:  # transformers' default: the output embeddings stay
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        patterns = [name for name, module in model.named_modules() if output is not None and module is output]
    patterns = [*patterns, *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    ub = quantization_config.get("activation_scale_ub", 1200.0)  # FbgemmFp8Config's default
    options = {"activation_scale_ub": None if ub is None or float(ub) >= NO_ACTIVATION_SCALE_UB else float(ub)}
    layers = {name: "fp8_rowwise" for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and not _not_converted(name, patterns)}
    return layers, {"fp8_rowwise": options}


def _args_problem(args: dict | None, what: str, kind: str, strategy: str, dynamic: bool) -> str | None:
    """Why compressed-tensors QuantizationArgs `args` are not 8-bit symmetric `kind` with `strategy`
    and `dynamic`, as "<what>.<field> is <value> (<why>)"; None if they are."""
    if args is None:
        return f"{what} is null ({'weight-only quantization: fxquant quantizes activations too' if what == 'input_activations' else 'nothing quantized'})"
    wanted = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": strategy, "dynamic": dynamic}
    defaults = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    for field, value in wanted.items():
        given = args.get(field, defaults[field])
        if given != value:
            why = {"dynamic": "static activation scales (input_scale): fxquant computes them at run time"
                   if what == "input_activations" else "fxquant stores weight scales"}.get(field, f"fxquant runs {value!r}")
            return f"{what}.{field} is {json.dumps(given)} ({why})"
    return None


def _group_scheme(group: dict, checkpoint_format: str) -> tuple[str, dict]:
    """(scheme, options) of one compressed-tensors config group; Unsupported naming the field."""
    weights, activations = group.get("weights"), group.get("input_activations")
    group_format = group.get("format") or checkpoint_format
    if group.get("output_activations") is not None:
        raise Unsupported("output_activations is set (fxquant does not quantize outputs)")
    if not isinstance(weights, dict):
        raise Unsupported("weights is null (nothing quantized)")
    kind = weights.get("type", "int")
    formats = {"float": ("float-quantized", "naive-quantized"), "int": ("int-quantized", "naive-quantized")}
    if group_format not in formats.get(kind, ()):
        raise Unsupported(f"format is {json.dumps(group_format)} (fxquant reads float-quantized, int-quantized and naive-quantized)")
    strategy = weights.get("strategy", "tensor")
    rules = {("float", "channel"): ("fp8_rowwise", "token"), ("float", "block"): ("fp8_blockwise", "group"),
             ("float", "tensor"): ("fp8_tensorwise", "tensor"), ("int", "channel"): ("int8", "token")}
    if (kind, strategy) not in rules:
        raise Unsupported(f"weights.strategy is {json.dumps(strategy)} for type {json.dumps(kind)} (fxquant runs "
                          "float channel, block and tensor, int channel)")
    scheme, activation_strategy = rules[kind, strategy]
    problem = _args_problem(weights, "weights", kind, strategy, False) or _args_problem(
        activations, "input_activations", kind, activation_strategy, True)
    if problem:
        raise Unsupported(problem)
    if scheme == "fp8_blockwise":
        block = weights.get("block_structure")
        if activations.get("group_size") != (block[1] if isinstance(block, list) and len(block) == 2 else None):
            raise Unsupported(f"input_activations.group_size is {activations.get('group_size')}, not the weight block's K "
                              f"(weights.block_structure {block})")
        return scheme, {"weight_block_size": tuple(block)}
    return scheme, {}


def _matches(name: str, module: nn.Module, target: str) -> int | None:
    """How specifically compressed-tensors' `target` matches a module (0 exact name, 1 regex, 2 class), or None."""
    if target == name:
        return 0
    if target.startswith("re:") and re.match(target.removeprefix("re:"), name):
        return 1
    if any(cls.__name__ == target for cls in type(module).__mro__):
        return 2
    return None


def _rank(name: str, module: nn.Module, targets: list[str]) -> int | None:
    """The most specific match of any of a group's `targets`, or None."""
    ranks = [rank for target in targets if (rank := _matches(name, module, target)) is not None]
    return min(ranks, default=None)


def _compressed_tensors_layers(model: nn.Module, quantization_config: dict, path: Path) -> tuple[dict[str, str], dict]:
    """{layer: scheme} for every nn.Linear a config group targets and `ignore` does not, and each scheme's options."""
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if quantization_config.get(field):
            raise ValueError(f"fxquant: {path}: quantization_config.{field} is set; fxquant cannot run it exactly")
    groups = quantization_config.get("config_groups") or {}
    ignore = quantization_config.get("ignore") or []
    checkpoint_format = quantization_config.get("format")
    layers, options = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(_matches(name, module, target) is not None for target in ignore):
            continue
        ranked = sorted((rank, group_name) for group_name, group in groups.items()
                        for rank in [_rank(name, module, group.get("targets") or [])] if rank is not None)
        if not ranked:
            continue
        group_name = ranked[0][1]
        try:
            scheme, scheme_options = _group_scheme(groups[group_name], checkpoint_format)
        except Unsupported as error:
            raise ValueError(f"fxquant: {path}: layer '{name}' (config_groups.{group_name}): {error}") from None
        if options.setdefault(scheme, scheme_options) != scheme_options:
            raise ValueError(f"fxquant: {path}: layer '{name}' (config_groups.{group_name}): {scheme} with {scheme_options}, "
                             f"another layer with {options[scheme]}; fxquant runs one set of options per scheme")
        layers[name] = scheme
    return layers, options


def _tied(model: nn.Module, stored: set[str], quantized: set[str]) -> dict[str, str]:
    """{name: stored name} for the model's tensors the files lack because they are another (tied embeddings)."""
    first: dict[int, str] = {}
    tied = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in sorted(named, key=lambda item: item[0] not in stored):  # stored names first
        if id(t) in first and name not in stored and not {name, first[id(t)]} & quantized:
            tied[name] = first[id(t)]
        first.setdefault(id(t), name)
    return tied


def read_foreign(directory: Path, model: nn.Module) -> tuple[dict, QuantConfig, dict[str, tuple[torch.dtype, tuple]]]:
    """fxquant.json's content for a checkpoint without one, from config.json's quantization_config and
    the files' headers, with the QuantConfig whose options the layers run with, and the exact
    conversions ({tensor: (dtype, shape)}) its scales need; no checksums (none were recorded)."""
    path = directory / HF_CONFIG_FILE
    try:
        quantization_config = json.loads(path.read_text()).get("quantization_config")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"fxquant: {path}: not a JSON object ({error})") from error
    if not isinstance(quantization_config, dict):
        raise FileNotFoundError(f"fxquant: {directory / METADATA_FILE} not found and {path} has no quantization_config: "
                                "not a quantized checkpoint")
    method = quantization_config.get("quant_method")
    if method == "fbgemm_fp8":
        layers, options = _fbgemm_layers(model, quantization_config)
    elif method == "compressed-tensors":
        layers, options = _compressed_tensors_layers(model, quantization_config, path)
    else:
        raise ValueError(f"fxquant: {path}: quant_method {method!r}; without {METADATA_FILE} fxquant reads fbgemm_fp8 and compressed-tensors")
    weight_map = _weights_map(directory)
    header = {name: spec for file in sorted(set(weight_map.values())) for name, spec in read_header(directory / file).items()}
    config = QuantConfig(scheme=next(iter(layers.values()), "fp8_rowwise"), skip=(), scheme_options=options)
    modules = dict(model.named_modules())
    plan, conversions, quantized = [], {}, set()
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        scheme = layers.get(name)
        plan.append({"layer": name, "shape": [module.out_features, module.in_features], "scheme": scheme,
                     "note": f"{method}: {scheme}" if scheme else f"{method}: not quantized"})
        if scheme is None:
            continue
        plugin, n, k = get_scheme(scheme), module.out_features, module.in_features
        layout = plugin.layout(n, k, config.options_for(scheme))
        for attr, (dtype, op_shape) in layout.items():
            key = tensor_key(name, attr)
            quantized.add(key)
            stored = header.get(key)
            file_shape = plugin.file_shape(attr, op_shape)
            if attr != "weight" and stored is not None and stored != (dtype, file_shape) and stored[0] in SCALE_FLOATS \
                    and dtype == torch.float32 and plugin.op_shape(attr, stored[1], n, k, config.options_for(scheme)) is not None:
                conversions[key] = (dtype, file_shape)
    metadata = {
        "plan": plan,
        "tensors": {name: {"dtype": dtype_name(dtype), "shape": list(shape), "file": weight_map.get(name, WEIGHTS_FILE)}
                    for name, (dtype, shape) in header.items()},
        "tied": _tied(model, set(header), quantized),
        "sha256": dict.fromkeys(sorted(set(weight_map.values()))),
    }
    return metadata, config, conversions
