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

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from fxquant.checkpoint_experts import expert_tensors, file_layout
from fxquant.checkpoint_metadata import HF_CONFIG_FILE, METADATA_FILE, read_header, tensor_key
from fxquant.config import QuantConfig
from fxquant.footprint import dtype_name
from fxquant.hf_formats import NO_ACTIVATION_SCALE_UB, not_converted
from fxquant.scheme import get_scheme
from fxquant.shards import INDEX_FILE, WEIGHTS_FILE

SCALE_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# How a stored tensor becomes what the op takes, exactly: (dtype, shape, rows): widened to dtype, each row
# repeated `rows` times (a block scale onto finer blocks) and cut to the shape's rows, reshaped.
Conversion = tuple  # (torch.dtype, tuple[int, ...]) or (torch.dtype, tuple[int, ...], int)


def converted(value: torch.Tensor, conversion: Conversion) -> torch.Tensor:
    dtype, shape, *rows = conversion
    value = value.to(dtype)
    if rows:
        value = value.repeat_interleave(rows[0], dim=0)[: shape[0]]
    return value.reshape(shape)


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


def _skipped_patterns(model: nn.Module, quantization_config: dict) -> list[str]:
    """transformers' modules_to_not_convert: the config's, else the output embeddings, and the model's fp32 modules."""
    patterns = quantization_config.get("modules_to_not_convert")
    if patterns is None:  # transformers' default: the output embeddings stay
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        patterns = [name for name, module in model.named_modules() if output is not None and module is output]
    return [*patterns, *(getattr(model, "_keep_in_fp32_modules", None) or [])]


def _fbgemm_layers(model: nn.Module, quantization_config: dict) -> tuple[dict[str, str], dict]:
    """{layer: "fp8_rowwise"} for every nn.Linear transformers' fbgemm_fp8 converts, and the options."""
    patterns = _skipped_patterns(model, quantization_config)
    ub = quantization_config.get("activation_scale_ub", 1200.0)  # FbgemmFp8Config's default
    options = {"activation_scale_ub": None if ub is None or float(ub) >= NO_ACTIVATION_SCALE_UB else float(ub)}
    layers = {name: "fp8_rowwise" for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and not not_converted(name, patterns)}
    return layers, {"fp8_rowwise": options}


# transformers' FineGrainedFP8Config fields fxquant runs exactly, and the values it runs.
FINEGRAINED_FIELDS = {"activation_scheme": ("dynamic", "static activation scales: fxquant computes them at run time"),
                      "scale_fmt": ("float", "fxquant stores float32 scales"),
                      "expert_dtype": ("fp8", "fxquant runs e4m3 experts")}


def _finegrained_fp8_layers(model: nn.Module, quantization_config: dict, path: Path) -> tuple[dict[str, str], dict, set[str]]:
    """transformers' finegrained_fp8 ("fp8", DeepSeek-V3's layout): {layer: "fp8_blockwise"} for every plain
    nn.Linear it converts, its options, and the expert weights of every `*.experts` module it converts."""
    for field, (wanted, why) in FINEGRAINED_FIELDS.items():
        given = quantization_config.get(field, wanted)
        if str(given).lower() != wanted:
            raise ValueError(f"fxquant: {path}: quantization_config.{field} is {json.dumps(given)} ({why})")
    if quantization_config.get("modules_to_convert"):
        raise ValueError(f"fxquant: {path}: quantization_config.modules_to_convert is set (FP8 embeddings: fxquant "
                         "quantizes linear layers and experts)")
    block = quantization_config.get("weight_block_size", [128, 128])
    try:
        options = get_scheme("fp8_blockwise").options({"weight_block_size": tuple(block)})
    except (TypeError, ValueError) as error:
        raise ValueError(f"fxquant: {path}: quantization_config.weight_block_size is {json.dumps(block)} ({error})") from None
    patterns = _skipped_patterns(model, quantization_config)
    layers = {name: "fp8_blockwise" for name, module in model.named_modules()
              if type(module) is nn.Linear and not not_converted(name, patterns)}
    experts = {name for name in expert_tensors(model)
               if name.rpartition(".")[0].endswith(".experts") and not not_converted(name.rpartition(".")[0], patterns)}
    return layers, {"fp8_blockwise": {"weight_block_size": options.weight_block_size}}, experts


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


def _matches(name: str, classes: tuple[str, ...], target: str) -> int | None:
    """How specifically compressed-tensors' `target` matches a module of `classes` (its class and bases)
    by name (0 exact name, 1 regex, 2 class), or None."""
    if target == name:
        return 0
    if target.startswith("re:") and re.match(target.removeprefix("re:"), name):
        return 1
    if target in classes:
        return 2
    return None


def _rank(name: str, classes: tuple[str, ...], targets: list[str]) -> int | None:
    """The most specific match of any of a group's `targets`, or None."""
    ranks = [rank for target in targets if (rank := _matches(name, classes, target)) is not None]
    return min(ranks, default=None)


def _linears_to_match(model: nn.Module) -> list[tuple[str, tuple[str, ...], str]]:
    """(module name, its classes, the layer it belongs to) for every nn.Linear and every expert's part,
    a Linear in HF's per-expert layout (compressed-tensors' targets match it as one)."""
    found = [(name, tuple(cls.__name__ for cls in type(module).__mro__), name)
             for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for expert in expert_tensors(model).values():
        found += [(part.format(e=e), ("Linear",), expert.name) for e in range(expert.shape[0]) for part in expert.parts]
    return found


def _compressed_tensors_layers(model: nn.Module, quantization_config: dict, path: Path) -> tuple[dict[str, str], dict]:
    """{layer: scheme} for every nn.Linear (and expert weight, each expert a Linear) a config group targets
    and `ignore` does not, and each scheme's options; an expert weight whose experts differ is an error."""
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if quantization_config.get(field):
            raise ValueError(f"fxquant: {path}: quantization_config.{field} is set; fxquant cannot run it exactly")
    groups = quantization_config.get("config_groups") or {}
    ignore = quantization_config.get("ignore") or []
    checkpoint_format = quantization_config.get("format")
    layers, options, seen = {}, {}, {}
    for name, classes, layer in _linears_to_match(model):
        scheme = None
        if not any(_matches(name, classes, target) is not None for target in ignore):
            ranked = sorted((rank, group_name) for group_name, group in groups.items()
                            for rank in [_rank(name, classes, group.get("targets") or [])] if rank is not None)
            scheme = _ranked_scheme(name, ranked, groups, checkpoint_format, options, path)
        if seen.setdefault(layer, (name, scheme))[1] != scheme:
            raise ValueError(f"fxquant: {path}: expert '{name}' is {scheme or 'not quantized'}, '{seen[layer][0]}' "
                             f"{seen[layer][1] or 'not quantized'}; fxquant runs the experts of '{layer}' as one tensor")
        if scheme is not None:
            layers[layer] = scheme
    return layers, options


def _ranked_scheme(name: str, ranked: list, groups: dict, checkpoint_format: str | None, options: dict, path: Path) -> str | None:
    """The scheme of the most specific group matching `name` (None: none matches); its options join `options`."""
    if not ranked:
        return None
    group_name = ranked[0][1]
    try:
        scheme, scheme_options = _group_scheme(groups[group_name], checkpoint_format)
    except Unsupported as error:
        raise ValueError(f"fxquant: {path}: layer '{name}' (config_groups.{group_name}): {error}") from None
    if options.setdefault(scheme, scheme_options) != scheme_options:
        raise ValueError(f"fxquant: {path}: layer '{name}' (config_groups.{group_name}): {scheme} with {scheme_options}, "
                         f"another layer with {options[scheme]}; fxquant runs one set of options per scheme")
    return scheme


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


def renamed_key(layer: str, file_names: dict[str, str]) -> str:
    """The file's name of a layer's weight_scale (finegrained_fp8: weight_scale_inv)."""
    return tensor_key(layer, file_names.get("weight_scale", "weight_scale"))


def _finer_blocks(stored: tuple | None, n: int, k: int, options) -> tuple[tuple[int, int], int] | None:
    """For a float32 block scale stored [ceil(N / bn), K / bk] (DeepSeek's last block of rows partial), the
    finer block (g, bk), g = gcd(N, bn) a multiple of 16, that runs it exactly, and how often each scale
    row repeats onto it; None where there is none."""
    block_n, block_k = options.weight_block_size
    finer = math.gcd(n, block_n)
    fits = stored is not None and stored == (torch.float32, (-(-n // block_n), k // block_k)) and k % block_k == 0
    return ((finer, block_k), block_n // finer) if fits and finer % 16 == 0 else None


def _same_but_unit_dims(shape: tuple[int, ...], other: tuple[int, ...]) -> bool:
    """The same sizes once dims of size 1 are dropped ([N] and [N, 1], [1] and []): a reshape keeps each value's place."""
    return [d for d in shape if d != 1] == [d for d in other if d != 1]


def read_foreign(directory: Path, model: nn.Module) -> tuple[dict, QuantConfig, dict[str, tuple[torch.dtype, tuple]]]:
    """fxquant.json's content for a checkpoint without one, from config.json's quantization_config and
    the files' headers, with the QuantConfig whose options the layers run with, and the exact
    conversions ({tensor: (dtype, shape)}) its scales need; no checksums (none were recorded). Where
    the files name a tensor otherwise than fxquant (finegrained_fp8's `weight_scale_inv`, fxquant's
    `weight_scale`: both multiply the e4m3 values), metadata["renamed"] maps fxquant's name to the file's."""
    path = directory / HF_CONFIG_FILE
    try:
        quantization_config = json.loads(path.read_text()).get("quantization_config")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"fxquant: {path}: not a JSON object ({error})") from error
    if not isinstance(quantization_config, dict):
        raise FileNotFoundError(f"fxquant: {directory / METADATA_FILE} not found and {path} has no quantization_config: "
                                "not a quantized checkpoint")
    method = quantization_config.get("quant_method")
    file_names = {}
    if method == "fbgemm_fp8":
        layers, options = _fbgemm_layers(model, quantization_config)
    elif method == "compressed-tensors":
        layers, options = _compressed_tensors_layers(model, quantization_config, path)
    elif method == "fp8":
        layers, options, experts = _finegrained_fp8_layers(model, quantization_config, path)
        layers.update(dict.fromkeys(experts, "fp8_blockwise"))
        file_names = {"weight_scale": "weight_scale_inv"}
    else:
        raise ValueError(f"fxquant: {path}: quant_method {method!r}; without {METADATA_FILE} fxquant reads fbgemm_fp8, "
                         "compressed-tensors and fp8 (finegrained_fp8)")
    weight_map = _weights_map(directory)
    header = {name: spec for file in sorted(set(weight_map.values())) for name, spec in read_header(directory / file).items()}
    config = QuantConfig(scheme=next(iter(layers.values()), "fp8_rowwise"), skip=(), scheme_options=options)
    plan, conversions, quantized, renamed = [], {}, set(), {}
    rows = [(name, [module.out_features, module.in_features], None) for name, module in model.named_modules()
            if isinstance(module, nn.Linear)]
    rows += [(name, list(expert.shape[1:]), expert) for name, expert in expert_tensors(model).items() if name in layers]
    for name, (n, k), expert in rows:
        scheme = layers.get(name)
        plan.append({"layer": name, "shape": [n, k], "scheme": scheme,
                     "note": f"{method}: {scheme}" if scheme else f"{method}: not quantized"})
        if scheme is None:
            continue
        plugin, scheme_options = get_scheme(scheme), config.options_for(scheme)
        problem = plugin.unsupported(name, n, k, scheme_options)
        finer = _finer_blocks(header.get(renamed_key(name, file_names)), n, k, scheme_options) if problem and expert is None \
            and method == "fp8" else None
        if finer is not None:  # DeepSeek's partial last block of rows: each scale row repeated onto blocks of a divisor of N
            block, repeat = finer
            scheme_options = dataclasses.replace(scheme_options, weight_block_size=block)
            plan[-1]["options"] = {"weight_block_size": list(block)}
            conversions[tensor_key(name, "weight_scale")] = (torch.float32, (n // block[0], k // block[1]), repeat)
            problem = None
        if problem:
            raise ValueError(f"fxquant: {path}: layer '{name}' [{n}, {k}]: {problem} ({scheme}, from quantization_config: "
                             "fxquant runs whole blocks only)")
        if expert is not None:
            plan[-1].update(experts=expert.shape[0], expert_names=list(expert.parts))
            layout = file_layout(expert, scheme, scheme_options)
            keys = {key: key.rpartition(".")[2] for key in layout}
        else:
            layout = {tensor_key(name, attr): (dtype, plugin.file_shape(attr, shape))
                      for attr, (dtype, shape) in plugin.layout(n, k, scheme_options).items()}
            keys = {tensor_key(name, attr): attr for attr in plugin.tensors}
        for key, attr in keys.items():
            quantized.add(key)
            if attr in file_names:
                renamed[key] = key.removesuffix(attr) + file_names[attr]
            stored, (dtype, file_shape) = header.get(renamed.get(key, key)), layout[key]
            n_part = n // len(expert.parts) if expert is not None else n  # an expert's part: its share of N
            if key not in conversions and attr != "weight" and stored is not None and stored != (dtype, file_shape) and stored[0] in SCALE_FLOATS \
                    and dtype == torch.float32 and plugin.op_shape(attr, stored[1], n_part, k, scheme_options) is not None \
                    and _same_but_unit_dims(stored[1], file_shape):
                conversions[key] = (dtype, file_shape)
    to_fxquant = {file_name: name for name, file_name in renamed.items()}
    metadata = {
        "plan": plan,
        "tensors": {name: {"dtype": dtype_name(dtype), "shape": list(shape), "file": weight_map.get(name, WEIGHTS_FILE)}
                    for name, (dtype, shape) in header.items()},
        "tied": _tied(model, {to_fxquant.get(name, name) for name in header}, quantized),
        "sha256": dict.fromkeys(sorted(set(weight_map.values()))),
        "renamed": renamed,
    }
    return metadata, config, conversions
