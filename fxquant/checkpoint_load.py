"""`load_quantized`: a checkpoint's weights files, checked whole against fxquant.json (or the
quantization_config of a checkpoint others made: fxquant/foreign_checkpoints.py) and against the
model before anything changes, then read tensor by tensor straight onto the target device, one
file open at a time."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from fxquant.checkpoint_experts import ExpertJoin, ExpertTensor, file_layout, hold_stored_experts
from fxquant.checkpoint_layers import is_checkpoint_layer, is_conv1d, layer_shape, stored_layout, weight_transposed_in_file
from fxquant.checkpoint_metadata import HF_CONFIG_FILE, METADATA_FILE, read_header, read_metadata, tensor_key
from fxquant.checkpoint_slices import register_layer_sharding, tensor_slices
from fxquant.checkpoint_writer import file_sha256
from fxquant.config import QuantConfig
from fxquant.footprint import dtype_name
from fxquant.foreign_checkpoints import Conversion, converted, read_foreign
from fxquant.hf_formats import not_converted
from fxquant.log import logger
from fxquant.shards import INDEX_FILE
from fxquant.stored_layers import make_stored
from fxquant.tensor_parallel import local

Header = dict[str, tuple[torch.dtype, tuple[int, ...]]]

# A float tensor left unquantized may be stored in another of these: it is loaded as stored (a
# bf16 model's checkpoint into a model built in fp32), never cast; FP8 is only a quantized weight.
PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def layer_options(entry: dict, config: QuantConfig) -> object:
    """A plan row's scheme options: the config's, with the row's own where it has them (a foreign
    checkpoint's layer stored in finer blocks than the others)."""
    options = config.options_for(entry["scheme"])
    own = {name: tuple(value) if isinstance(value, list) else value for name, value in entry.get("options", {}).items()}
    return dataclasses.replace(options, **own) if own else options


def _check_table(path: Path, header: Header, table: dict) -> None:
    """A weights file holds exactly the tensors fxquant.json's table puts in it, with their dtypes and shapes."""
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


def _check_index(directory: Path, table: dict) -> None:
    """A sharded checkpoint's model.safetensors.index.json maps every tensor to the file fxquant.json names, and no other."""
    path = directory / INDEX_FILE
    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"fxquant: {path}: missing or not a JSON index ({error})") from error
    if not isinstance(weight_map, dict):
        raise ValueError(f"fxquant: {path}: no weight_map")
    for name in sorted(weight_map.keys() | table.keys()):
        indexed, recorded = weight_map.get(name), table.get(name, {}).get("file")
        if indexed != recorded:
            raise ValueError(
                f"fxquant: {path}: tensor '{name}' is in {indexed or 'no file'} there, in {recorded or 'no file'} by "
                f"{METADATA_FILE}; changed after saving?"
            )


def read_weights_headers(directory: Path, metadata: dict) -> tuple[Header, dict[str, str]]:
    """The headers of the weights files fxquant.json lists, checked against its table, merged: {name:
    (dtype, shape)} and {name: file}; a missing file, a tensor in two files or a table that a header
    does not bear out is an error naming the file and tensor."""
    table = metadata["tensors"]
    if len(metadata["sha256"]) > 1:
        _check_index(directory, table)
    headers: dict[str, Header] = {}
    file_of: dict[str, str] = {}
    for file in metadata["sha256"]:
        path = directory / file
        if not path.is_file():
            raise ValueError(f"fxquant: {path}: missing ({METADATA_FILE} lists it)")
        headers[file] = read_header(path)
        for name in headers[file]:
            if name in file_of:
                raise ValueError(f"fxquant: tensor '{name}' is in both {directory / file_of[name]} and {path}; which one is the checkpoint's?")
            file_of[name] = file
    merged: Header = {}
    for file, header in headers.items():
        _check_table(directory / file, header, {name: entry for name, entry in table.items() if entry["file"] == file})
        merged.update(header)
    return merged, file_of


def _expert_joins(directory: Path, model: nn.Module, metadata: dict, config: QuantConfig,
                  device: str | torch.device) -> list[ExpertJoin]:
    """The expert weights the plan stores one tensor per expert (fxquant/checkpoint_experts.py), each to
    be gathered into the op's [E, N, K] tensors on `device`; a model without that [E, N, K] parameter
    is an error naming it."""
    joins = []
    parameters = dict(model.named_parameters())
    for entry in metadata["plan"]:
        if entry["scheme"] is None or "expert_names" not in entry:
            continue
        layer, shape = entry["layer"], (entry["experts"], *entry["shape"])
        held = parameters.get(layer)
        if held is None or tuple(held.shape) != shape:
            found = "no such parameter" if held is None else f"{list(held.shape)}"
            raise ValueError(f"fxquant: {directory}: expert weight '{layer}' was quantized from an E x N x K = "
                             f"{' x '.join(map(str, shape))} parameter, but the model's is {found}; is it a checkpoint "
                             "for another architecture?")
        expert = ExpertTensor(layer, shape, tuple(entry["expert_names"]))
        joins.append(ExpertJoin(expert, entry["scheme"], config.options_for(entry["scheme"]), device))
    return joins


def _expected_tensors(
    directory: Path, model: nn.Module, metadata: dict, config: QuantConfig, joins: list[ExpertJoin] = ()
) -> tuple[dict[str, tuple[torch.dtype, tuple]], set[str]]:
    """What a checkpoint for `model` must hold, {name: (dtype, shape)}, and the names of the quantized
    tensors; an expert weight of `joins` as its per-expert tensors."""
    expected = {name: (t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()}
    quantized = set()
    for join in joins:
        del expected[join.expert.name]
        layout = file_layout(join.expert, join.scheme, join.options)
        expected.update(layout)
        quantized.update(layout)
    modules = dict(model.named_modules())
    for entry in metadata["plan"]:
        if entry["scheme"] is None or "expert_names" in entry:
            continue
        layer = entry["layer"]
        module = modules.get(layer)
        if not (module is not None and is_checkpoint_layer(module) and layer_shape(module) == entry["shape"]):
            n, k = entry["shape"]
            held = metadata["tensors"].get(tensor_key(layer, "weight"), {}).get("file")
            raise ValueError(
                f"fxquant: {directory / held if held else directory}: tensor '{tensor_key(layer, 'weight')}' was quantized from an N x K = {n} x {k} "
                f"nn.Linear or Conv1D, but the model's '{layer}' is {module!r}; is it a checkpoint for another architecture?"
            )
        options = layer_options(entry, config)
        for attr, dtype_shape in stored_layout(entry["scheme"], *entry["shape"], options, is_conv1d(module)).items():
            expected[tensor_key(layer, attr)] = dtype_shape
            quantized.add(tensor_key(layer, attr))
    return expected, quantized


def _check_ties(path: Path, tied: dict[str, str], model: nn.Module) -> None:
    """Each name `tied` stores as another is that very tensor in the model (tied embeddings): the
    same object, as on the meta device, or the same memory (a DTensor's: its local part's; its own
    data_ptr is 0)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    identity = {
        name: id(t) if t.is_meta or t.numel() == 0 else (t.device, local(t).data_ptr(), t.dtype, t.shape, t.stride())
        for name, t in named
    }
    for alias, target in tied.items():
        if alias not in identity or identity[alias] != identity.get(target):
            raise ValueError(
                f"fxquant: {path}: tied says '{alias}' is stored as '{target}', but the model's '{alias}' is "
                f"{'no tensor' if alias not in identity else 'a tensor of its own'}: is the model of another "
                f"architecture or config (tie_word_embeddings), or was {METADATA_FILE} edited?"
            )


def _check_tensors(directory: Path, where: Callable[[str], Path], header: Header, tied: dict[str, str],
                   expected: dict, quantized: set[str]) -> None:
    """Every tensor the model needs is in the files with the right dtype and shape, and no other."""
    found = {name: header[tied.get(name, name)] for name in expected if tied.get(name, name) in header}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"fxquant: {directory} does not fit the model (another architecture?): "
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
                f"fxquant: {where(tied.get(name, name))}: tensor '{name}' is {stored_dtype} {list(stored_shape)}; "
                f"the model needs {wanted}, shape {list(shape)}"
            )


def _check_no_meta_left(model: nn.Module, expected: Mapping[str, object], joined: set[str]) -> None:
    left = [
        name
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        if t.is_meta and name not in expected and name not in joined
    ]
    if left:
        raise ValueError(
            f"fxquant: {', '.join(left[:5])} are on the meta device and not in the checkpoint (non-persistent "
            "buffers?); create the model under fxquant.checkpoint.empty_weights(), which keeps buffers real"
        )


def _assign(model: nn.Module, name: str, value: Tensor, quantized: bool, made: dict[int, Tensor], transposed: bool = False) -> None:
    """Put `value` in place of the parameter or buffer `name`; tied names get one shared Parameter.
    A `transposed` quantized weight (a Conv1D's, [K, N] in the file) is held [N, K], as the op takes it."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attr)
    if old is None:
        module.register_buffer(attr, value)
        return
    if id(value) not in made:
        held = value.t().contiguous() if transposed else value
        made[id(value)] = nn.Parameter(held, requires_grad=old.requires_grad and not quantized)
    module._parameters[attr] = made[id(value)]


def _warn_of_float32_layers(directory: Path, model: nn.Module, metadata: dict) -> None:
    """Warn of quantized layers the model class keeps in float32 (a checkpoint written before fxquant
    left them float, or by another tool): T5's forward casts its input to `wo`'s dtype and fails."""
    patterns = getattr(model, "_keep_in_fp32_modules", None) or ()
    layers = [entry["layer"] for entry in metadata["plan"] if entry["scheme"] is not None and not_converted(entry["layer"], patterns)]
    if layers:
        more = f" and {len(layers) - 1} more" if len(layers) > 1 else ""
        logger.warning(f"fxquant: {directory} holds {layers[0]!r}{more} quantized, layers {type(model).__name__} keeps "
                       f"in float32 ({type(model).__name__}._keep_in_fp32_modules {sorted(patterns)}): its forward may read "
                       "their dtype (T5's casts its input to it); quantize the float model again to leave them float")


def load_quantized(
    directory: str | Path, model: nn.Module, device: str | torch.device = "cpu", verify_checksum: bool = True
) -> nn.Module:
    """Load a checkpoint into `model` (its float or meta-device version) and return it: one of
    `save_quantized` or `fxquant quantize` (one model.safetensors or shards and their index), or,
    without fxquant.json, an FP8 checkpoint in HF transformers' fbgemm_fp8 or llm-compressor's
    compressed-tensors layout (fxquant/foreign_checkpoints.py says what maps to which scheme).

    The checkpoint is checked first (readable files, known scheme, every tensor present once with
    the dtype and shape the model needs, nothing extra, the index agreeing with fxquant.json); on
    any error the model is left unchanged. Quantized layers then hold `weight` as a low-precision
    nn.Parameter (requires_grad=False; [N, K], a Conv1D's too) and their scheme's other tensors as
    buffers (`weight_scale`, ...), registered as stored weights with the scheme the plan names and
    the checkpoint config's options, so that the fxquant backend and `fxquant.export` use them
    without quantizing again. Each tensor is read on its own (safetensors' safe_open, one file open
    at a time) straight onto `device` and assigned, not copied: the model is never in CPU memory
    whole unless `device` is the CPU. Into a tensor-parallel model (DTensor parameters, as
    `parallelize_module` leaves them, on the meta device or float) each rank reads only its slice of
    each split tensor, a quantized layer's split as its weight (fxquant/checkpoint_slices.py);
    `device` is then this rank's. Each such layer's class becomes a subclass of its own
    (StoredLinear, StoredConv1D: fxquant/stored_layers.py), so the model also runs without
    compiling, through fxquant's ops with the compiled numerics; `save_quantized` of the loaded
    model writes its stored tensors back as they are.
    `verify_checksum` compares each weights file with the SHA-256 recorded at save time (one read
    of the files), so changed data bytes are caught, not only a damaged header; False skips that
    read, an explicit opt-out (fxquant.json must record the checksums either way; checkpoints others
    made record none). fxquant.json itself must agree with the files (its tensor table) and the
    model (its tied names).
    """
    directory = Path(directory)
    conversions: dict[str, Conversion] = {}
    if not (directory / METADATA_FILE).is_file() and (directory / HF_CONFIG_FILE).is_file():
        metadata, config, conversions = read_foreign(directory, model)
    else:
        metadata, config = read_metadata(directory)
    header, file_of = read_weights_headers(directory, metadata)
    renamed = metadata.get("renamed", {})  # fxquant's name → the file's (a foreign checkpoint's weight_scale_inv)
    to_fxquant = {file_name: name for name, file_name in renamed.items()}
    header = {to_fxquant.get(name, name): spec for name, spec in header.items()}
    file_of = {to_fxquant.get(name, name): file for name, file in file_of.items()}
    tied = metadata["tied"]
    _check_ties(directory / METADATA_FILE, tied, model)
    joins = _expert_joins(directory, model, metadata, config, device)
    expected, quantized = _expected_tensors(directory, model, metadata, config, joins)
    as_loaded = {name: conversions[name][:2] if name in conversions else spec for name, spec in header.items()}
    _check_tensors(directory, lambda name: directory / file_of[name], as_loaded, tied, expected, quantized)
    _check_no_meta_left(model, expected, {join.expert.name for join in joins})
    options = {entry["layer"]: layer_options(entry, config) for entry in metadata["plan"] if entry["scheme"] is not None}
    transposed = {tensor_key(entry["layer"], "weight") for entry in metadata["plan"] if entry["scheme"] is not None
                  and "expert_names" not in entry and weight_transposed_in_file(entry["scheme"], is_conv1d(model.get_submodule(entry["layer"])))}
    slices = tensor_slices(directory, model, metadata, options, tied, set(conversions), {join.expert.name for join in joins}, device)
    for file, digest in metadata["sha256"].items():
        if verify_checksum and digest is not None and digest != file_sha256(directory / file):
            raise ValueError(f"fxquant: {directory / file}: SHA-256 differs from the one recorded in {METADATA_FILE}; the file was changed or corrupted")
    users: dict[str, list[str]] = {}
    for name in expected:
        users.setdefault(tied.get(name, name), []).append(name)
    join_of = {name: join for join in joins for name in join.places}
    for file in metadata["sha256"]:
        with safe_open(directory / file, framework="pt", device=str(device)) as tensors:
            for stored in [name for name in header if file_of[name] == file]:
                file_name = renamed.get(stored, stored)  # a DTensor of the model's: this rank's slice only
                value = slices[stored].read(tensors, file_name) if stored in slices else tensors.get_tensor(file_name)
                if stored in conversions:  # exact: a wider float, a reshape, block scales repeated onto finer blocks
                    value = converted(value, conversions[stored])
                if stored in join_of:  # one expert's part of an [E, N, K] expert weight
                    join_of[stored].put(stored, value)
                    continue
                made: dict[int, Tensor] = {}  # the names tied to it share one Parameter
                for name in users[stored]:
                    _assign(model, name, value, name in quantized, made, name in transposed)
    hold_stored_experts(model, joins)  # as the expert ops take them, registered as stored
    _warn_of_float32_layers(directory, model, metadata)
    for entry in metadata["plan"]:
        if entry["scheme"] is not None and "expert_names" not in entry:  # eager calls and torch.compile(backend="fxquant") run them as stored
            module = make_stored(model.get_submodule(entry["layer"]), entry["scheme"], options[entry["layer"]], entry["layer"])
            if tensor_key(entry["layer"], "weight") in slices:  # eager calls run the op on DTensors
                register_layer_sharding(entry["layer"], module, entry["scheme"], options[entry["layer"]])
    return model
