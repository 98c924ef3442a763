"""Quantized checkpoints as safetensors (never pickle), in fxquant's layout, which for fp8_rowwise
is also HF transformers' `fbgemm_fp8` layout.

A checkpoint is a directory:
    model.safetensors   the model's state dict, where each quantized nn.Linear holds its scheme's
                        tensors: `<layer>.weight` (e4m3 or int8, [N, K]) and, for the built-ins,
                        `<layer>.weight_scale` (float32: [N, 1] per channel, [N/bn, K/bk] per
                        block, [] per tensor); a plugin's `<layer>.weight_<...>` as it declares
    fxquant.json        format version, QuantConfig, plan (each layer's scheme: the declaration
                        load_quantized registers, never guessed), each tensor's dtype and shape, tied
                        names, bytes before/after, the weights file's SHA-256, the files the
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
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES  # "F8_E4M3" → torch.float8_e4m3fn, ...
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.export import ExportedProgram

from fxquant.checkpoint_dir import check_replaceable, replaced_atomically
from fxquant.checkpoint_schema import METADATA, mismatch
from fxquant.checkpoint_layers import (
    file_tensors, is_checkpoint_layer, is_conv1d, layer_shape, plan_modules, stored_layout, traced_storage,
)
from fxquant.config import QuantConfig
from fxquant.empty_weights import empty_weights  # noqa: F401  (fxquant.checkpoint.empty_weights, as before)
from fxquant.footprint import dtype_name, memory_footprint, tied_names
from fxquant.hf_formats import check_hf_format, hf_quantization_config
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.passes.quantize_weights import quantize_parameter
from fxquant.scheme import SCHEMES, get_scheme
from fxquant.stored_layers import make_stored

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "fxquant.json"
HF_CONFIG_FILE = "config.json"

Progress = Callable[[list[PlannedLinear]], Iterable[PlannedLinear]]


def _key(layer: str, attr: str) -> str:
    return f"{layer}.{attr}" if layer else attr


def check_storable(config: QuantConfig) -> None:
    """Checkpoints hold tensors, not graphs: a scheme that folds its tensors into constants cannot be saved."""
    for scheme in config.schemes_in_use():
        if get_scheme(scheme).folds_tensors(config.options_for(scheme)):
            raise ValueError(
                f"fxquant: checkpoints of {scheme} with tensors folded into the graph (static fp8_tensorwise: "
                "static_activation_amax) are not supported; save with dynamic scales (static_activation_amax=None)"
            )


def quantize_state(
    model: nn.Module, config: QuantConfig | None = None, progress: Progress | None = None
) -> tuple[dict[str, Tensor], Plan]:
    """The tensors of `model`'s quantized checkpoint, and the plan that chose its layers.

    Each quantized layer's `weight` becomes its low-precision copy and the layer gains its scheme's
    other tensors (`weight_scale`, ...), in the file's layout (fxquant/checkpoint_layers.py); a layer already stored
    quantized (a model from `load_quantized`) is written as stored, bit for bit; every other tensor
    of the state dict is kept as is. `progress` wraps the list of layers being quantized (e.g. with tqdm).
    """
    config = config or QuantConfig()
    check_storable(config)
    tensors = model.state_dict()
    on_meta = [name for name, t in tensors.items() if t.is_meta]
    if on_meta:
        raise ValueError(
            f"fxquant: cannot quantize weights on the meta device ({', '.join(on_meta[:5])}); load the model's weights first"
        )
    plan = plan_modules(model, config)
    for entry in (progress or iter)(plan.rewritten):
        site, module = entry.site, model.get_submodule(entry.layer)
        if entry.stored is not None:  # as loaded: the op's weight, the other tensors as the file held them
            n, k = site.out_features, site.in_features
            layout = stored_layout(entry.scheme, n, k, entry.options, False)
            quantized = {"weight": site.weight.detach(), **{name: t.reshape(layout[name][1]) for name, t in entry.stored.items()}}
        else:
            quantized = quantize_parameter(entry.layer, site.weight, site.weight_is_kn, entry.scheme, entry.options)
        for name, tensor in file_tensors(entry.scheme, quantized, is_conv1d(module)).items():
            tensors[_key(entry.layer, name)] = tensor
    return tensors, plan


def program_state(program: ExportedProgram) -> tuple[dict[str, Tensor], Plan, QuantConfig, int]:
    """The checkpoint tensors of a program made by `fxquant.export`, as `quantize_state` would give
    them for its model, with its plan, its config and the bytes of the float state it came from."""
    plan, config = getattr(program, "fxquant_plan", None), getattr(program, "fxquant_config", None)
    if plan is None or config is None:
        raise ValueError(
            "fxquant: save_quantized takes an ExportedProgram made by fxquant.export in this process (the plan "
            "does not survive torch.export.save/load); save the model instead, or the program with torch.export.save"
        )
    check_storable(config)
    made = [entry for entry in plan.rewritten if entry.quantized is not None]  # not the stored weights
    lifted = {attr for entry in made for attr in entry.quantized.attrs.values()}
    tensors = {name: t for name, t in program.state_dict.items() if name not in lifted}
    before = memory_footprint(tensors)
    for entry in made:
        conv1d = traced_storage(entry.layer, entry.site)
        for name, tensor in file_tensors(entry.scheme, entry.quantized.tensors, conv1d).items():
            tensors[_key(entry.layer, name)] = tensor
        before += entry.site.weight.numel() * entry.site.weight.element_size()
    return tensors, plan, config, before


def _write_json(path: Path, content: dict) -> None:
    """A new file (never an existing one, nor a symlink's target) holding `content` as JSON."""
    with open(path, "x") as file:
        file.write(json.dumps(content, indent=2, allow_nan=False) + "\n")


def save_quantized(
    model: nn.Module | ExportedProgram,
    directory: str | Path,
    config: QuantConfig | None = None,
    progress: Progress | None = None,
    hf_format: str | None = "auto",
    overwrite: bool = False,
) -> dict:
    """Write a checkpoint of `model`, quantized, into `directory` (see the module docstring); the
    model is not modified. A program made by `fxquant.export` is written with the weights and the
    config it was quantized with (`config` must then be None), and without an HF config.json (it
    has no HF config). `hf_format` chooses the quantization_config written for HF models:
    "fbgemm_fp8", "compressed-tensors", "auto" (the first of these that describes the scheme and
    every quantized layer) or None (no config.json). Returns what fxquant.json holds, including the bytes
    of the float state dict before and of the stored tensors after quantization.

    The directory is replaced whole, in one step (fxquant/checkpoint_dir.py): a save that fails
    leaves the earlier checkpoint as it was, and no file of an earlier save survives. It must be
    missing, empty or a checkpoint holding only the files its fxquant.json lists; anything else is
    refused unless `overwrite`, which replaces it and all it holds."""
    check_hf_format(hf_format)  # before any work
    check_replaceable(Path(directory), METADATA_FILE, overwrite)  # before the work of quantizing
    if isinstance(model, ExportedProgram):
        if config is not None:
            raise ValueError("fxquant: a program is saved with the config fxquant.export quantized it with; pass config=None")
        quantized, plan, config, before = program_state(model)
    else:
        config = config or QuantConfig()
        quantized, plan = quantize_state(model, config, progress)
        before = memory_footprint(model.state_dict())
    tied = tied_names(quantized)  # stored once; safetensors refuses shared memory
    tensors = {name: t.contiguous() for name, t in quantized.items() if name not in tied}
    quantization_config = hf_quantization_config(hf_format, plan, config)
    model_config = getattr(model, "config", None)
    hf_config = None
    if quantization_config is not None and hasattr(model_config, "to_dict"):  # an HF model: make it an HF checkpoint
        hf_config = {
            **model_config.to_dict(),
            "architectures": [type(model).__name__],  # as save_pretrained writes it
            "quantization_config": quantization_config,
        }
    with replaced_atomically(Path(directory), METADATA_FILE, overwrite) as staging:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})  # HF requires format "pt"
        metadata = {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(config),
            "plan": [
                {"layer": e.layer, "shape": [e.site.out_features, e.site.in_features], "scheme": e.scheme, "note": e.note}
                for e in plan
            ],
            "tensors": {name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()},
            "tied": tied,
            "bytes": {"before": before, "after": memory_footprint(tensors)},
            "sha256": file_sha256(staging / WEIGHTS_FILE),
            "files": [WEIGHTS_FILE, *([HF_CONFIG_FILE] if hf_config else []), METADATA_FILE],
        }
        if quantization_config is not None:
            metadata["quantization_config"] = quantization_config
        if hf_config is not None:
            _write_json(staging / HF_CONFIG_FILE, hf_config)
        _write_json(staging / METADATA_FILE, metadata)
    return metadata


def read_header(path: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Each tensor's (dtype, shape) from a safetensors file's header, without reading the data."""
    try:
        with safe_open(path, framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            return {name: (SAFETENSORS_DTYPES[s.get_dtype()], tuple(s.get_shape())) for name, s in slices.items()}
    except SafetensorError as error:
        raise ValueError(
            f"fxquant: {path} is not a readable safetensors file, truncated or tampered with? ({error})"
        ) from error
    except KeyError as error:
        raise ValueError(f"fxquant: {path} holds a tensor of dtype {error}, which torch has no dtype for") from error


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(directory: str | Path) -> tuple[dict, QuantConfig]:
    """fxquant.json of a checkpoint directory, checked, and the QuantConfig it names."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"fxquant: {path} not found; is {directory} a checkpoint written by fxquant.save_quantized?")
    try:
        metadata = json.loads(path.read_text())
    except ValueError as error:  # not UTF-8 or not JSON
        raise ValueError(f"fxquant: {path}: not a JSON file ({error})") from error
    problem = _metadata_problem(metadata)
    if problem:
        raise ValueError(f"fxquant: {path}: {problem}")
    try:
        config = QuantConfig.from_options(metadata["config"])
        check_storable(config)
    except ValueError as error:
        raise ValueError(f"fxquant: {path}: {str(error).removeprefix('fxquant: ')}") from error
    return metadata, config


def _metadata_problem(metadata: object) -> str | None:
    """What is wrong with fxquant.json on its own terms (version, structure, schemes, a plan or tied
    map that its tensor table does not bear out), or None."""
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if version != FORMAT_VERSION:
        return f"format_version {version!r} unsupported (this fxquant reads {FORMAT_VERSION})"
    problem = mismatch(metadata, METADATA, "")
    if problem:
        return problem
    table, tied = metadata["tensors"], metadata["tied"]
    layers = [entry["layer"] for entry in metadata["plan"]]
    if len(set(layers)) != len(layers):
        return f"the plan lists layer '{next(layer for layer in layers if layers.count(layer) > 1)}' twice"
    for entry in metadata["plan"]:
        layer, scheme = entry["layer"], entry["scheme"]
        if scheme is not None and scheme not in SCHEMES:
            return f"layer '{layer}' has unknown scheme {scheme!r}"
        names = SCHEMES[scheme].tensors if scheme is not None else ()
        absent = [_key(layer, attr) for attr in names if _key(layer, attr) not in {*table, *tied}]
        if scheme is not None and absent:
            return f"the plan quantizes layer '{layer}' ({scheme}), but the tensor table has no '{absent[0]}'"
    for alias, target in tied.items():
        if alias in table or target not in table:
            return f"tied maps '{alias}' to '{target}', but the tensor table {'holds' if alias in table else 'has no'} '{alias if alias in table else target}'"
    return None


def _expected_tensors(
    path: Path, model: nn.Module, metadata: dict, config: QuantConfig
) -> tuple[dict[str, tuple[torch.dtype, tuple]], set[str]]:
    """What a checkpoint for `model` must hold, {name: (dtype, shape)}, and the names of the quantized tensors.

    For tensors left as they were, a plain float dtype may differ (loaded as stored); any other dtype must match.
    """
    expected = {name: (t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()}
    quantized = set()
    modules = dict(model.named_modules())
    for entry in metadata["plan"]:
        if entry["scheme"] is None:
            continue
        layer = entry["layer"]
        module = modules.get(layer)
        if not (module is not None and is_checkpoint_layer(module) and layer_shape(module) == entry["shape"]):
            n, k = entry["shape"]
            raise ValueError(
                f"fxquant: {path}: tensor '{_key(layer, 'weight')}' was quantized from an N x K = {n} x {k} nn.Linear "
                f"or Conv1D, but the model's '{layer}' is {module!r}; is it a checkpoint for another architecture?"
            )
        options = config.options_for(entry["scheme"])
        for attr, dtype_shape in stored_layout(entry["scheme"], *entry["shape"], options, is_conv1d(module)).items():
            expected[_key(layer, attr)] = dtype_shape
            quantized.add(_key(layer, attr))
    return expected, quantized


def _check_table(path: Path, header: dict, table: dict) -> None:
    """The weights file holds exactly the tensors fxquant.json's table lists, with their dtypes and shapes."""
    stored = {name: (dtype_name(dtype), list(shape)) for name, (dtype, shape) in header.items()}
    recorded = {name: (entry["dtype"], entry["shape"]) for name, entry in table.items()}
    for name in sorted(stored.keys() | recorded.keys()):
        if stored.get(name) != recorded.get(name):
            raise ValueError(
                f"fxquant: {path}: tensor '{name}' is {_dtype_and_shape(stored.get(name), 'torch.')}; "
                f"{METADATA_FILE} records {_dtype_and_shape(recorded.get(name), '')}; changed after saving?"
            )


def _dtype_and_shape(entry: tuple[str, list] | None, prefix: str) -> str:
    return "absent" if entry is None else f"{prefix}{entry[0]} {entry[1]}"


def _check_ties(path: Path, tied: dict[str, str], model: nn.Module) -> None:
    """Each name fxquant.json's `tied` stores as another is that very tensor in the model (tied
    embeddings): the same object, as on the meta device, or the same memory."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    identity = {
        name: id(t) if t.is_meta or t.numel() == 0 else (t.device, t.data_ptr(), t.dtype, t.shape, t.stride())
        for name, t in named
    }
    for alias, target in tied.items():
        if alias not in identity or identity[alias] != identity.get(target):
            raise ValueError(
                f"fxquant: {path}: tied says '{alias}' is stored as '{target}', but the model's '{alias}' is "
                f"{'no tensor' if alias not in identity else 'a tensor of its own'}; was {METADATA_FILE} edited?"
            )


# A float tensor left unquantized may be stored in another of these: it is loaded as stored (a
# bf16 model's checkpoint into a model built in fp32), never cast; FP8 is only a quantized weight.
PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensors(path: Path, header: dict, tied: dict[str, str], expected: dict, quantized: set[str]) -> None:
    """Every tensor the model needs is in the file with the right dtype and shape, and no other."""
    found = {name: header[tied.get(name, name)] for name in expected if tied.get(name, name) in header}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"fxquant: {path} does not fit the model (another architecture?): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, (dtype, shape) in expected.items():
        stored_dtype, stored_shape = found[name]
        if name in quantized or dtype not in PLAIN_FLOATS:
            dtype_fits, wanted = stored_dtype == dtype, str(dtype)
        else:
            dtype_fits, wanted = stored_dtype in PLAIN_FLOATS, "float16, bfloat16, float32 or float64"
        if not dtype_fits or stored_shape != shape:
            raise ValueError(
                f"fxquant: {path}: tensor '{name}' is {stored_dtype} {list(stored_shape)}; "
                f"the model needs {wanted}, shape {list(shape)}"
            )


def _check_no_meta_left(model: nn.Module, expected: Mapping[str, object]) -> None:
    left = [
        name
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        if t.is_meta and name not in expected
    ]
    if left:
        raise ValueError(
            f"fxquant: {', '.join(left[:5])} are on the meta device and not in the checkpoint (non-persistent "
            "buffers?); create the model under fxquant.checkpoint.empty_weights(), which keeps buffers real"
        )


def _assign(model: nn.Module, name: str, value: Tensor, quantized: bool, made: dict[int, Tensor]) -> None:
    """Put `value` in place of the parameter or buffer `name`; tied names get one shared Parameter.
    A Conv1D's quantized weight, [K, N] in the file, is held [N, K], as the op takes it."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attr)
    if old is None:
        module.register_buffer(attr, value)
        return
    if id(value) not in made:
        held = value.t().contiguous() if quantized and attr == "weight" and is_conv1d(module) else value
        made[id(value)] = nn.Parameter(held, requires_grad=old.requires_grad and not quantized)
    module._parameters[attr] = made[id(value)]


def load_quantized(
    directory: str | Path, model: nn.Module, device: str | torch.device = "cpu", verify_checksum: bool = True
) -> nn.Module:
    """Load a checkpoint of `save_quantized` into `model` (its float or meta-device version) and return it.

    The checkpoint is checked first (readable file, known scheme, every tensor present with the
    dtype and shape the model needs, nothing extra); on any error the model is left unchanged.
    Quantized layers then hold `weight` as a low-precision nn.Parameter (requires_grad=False; [N, K],
    a Conv1D's too) and their scheme's other tensors as buffers (`weight_scale`, ...), registered as
    stored weights with the scheme fxquant.json's plan names and its options from the checkpoint's
    config, so that the fxquant backend and `fxquant.export` use them
    without quantizing again; every tensor is assigned, not copied, on `device`. Each such layer's
    class becomes a subclass of its own (StoredLinear, StoredConv1D: fxquant/stored_layers.py), so
    the model also runs without compiling, through fxquant's ops with the compiled numerics;
    `save_quantized` of the loaded model writes its stored tensors back as they are.
    `verify_checksum` compares the weights file with the SHA-256 recorded at save time (one read
    of the file), so changed data bytes are caught, not only a damaged header; False skips that
    read, an explicit opt-out (fxquant.json must record the checksum either way). fxquant.json
    itself must agree with the file (its tensor table) and the model (its tied names).
    """
    directory = Path(directory)
    metadata, config = read_metadata(directory)
    path = directory / WEIGHTS_FILE
    header = read_header(path)
    _check_table(path, header, metadata["tensors"])
    tied = metadata["tied"]
    _check_ties(directory / METADATA_FILE, tied, model)
    expected, quantized = _expected_tensors(path, model, metadata, config)
    _check_tensors(path, header, tied, expected, quantized)
    _check_no_meta_left(model, expected)
    if verify_checksum and metadata["sha256"] != file_sha256(path):
        raise ValueError(f"fxquant: {path}: SHA-256 differs from the one recorded in {METADATA_FILE}; the file was changed or corrupted")
    tensors = load_file(path, device=str(device))
    made: dict[int, Tensor] = {}
    for name in expected:
        _assign(model, name, tensors[tied.get(name, name)], name in quantized, made)
    for entry in metadata["plan"]:
        if entry["scheme"] is not None:  # eager calls and torch.compile(backend="fxquant") run them as stored
            make_stored(model.get_submodule(entry["layer"]), entry["scheme"], config.options_for(entry["scheme"]))
    return model
