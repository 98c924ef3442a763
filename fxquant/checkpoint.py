"""Quantized checkpoints as safetensors (never pickle), in fxquant's layout, which for fp8_rowwise
is also HF transformers' `fbgemm_fp8` layout.

A checkpoint is a directory:
    model.safetensors   the model's state dict, where each quantized nn.Linear holds
                        `<layer>.weight` (e4m3 or int8, [N, K]) and `<layer>.weight_scale`
                        (float32: [N, 1] per channel, [N/bn, K/bk] per block, [] per tensor)
    fxquant.json        format version, QuantConfig, plan, each tensor's dtype and shape, tied
                        names, bytes before/after, and the quantization_config of config.json
    config.json         HF models only: the model's config plus a quantization_config that
                        transformers understands: {"quant_method": "fbgemm_fp8", ...} for
                        fp8_rowwise (hf_format="fbgemm_fp8", the default), or llm-compressor's
                        compressed-tensors config (hf_format="compressed-tensors": fp8_rowwise,
                        fp8_blockwise, int8; what vLLM loads). Otherwise none: transformers would
                        cast the weights to float and load garbage.

`load_quantized` checks the whole checkpoint against the model before it changes anything, then
assigns the stored tensors (no copy into the float parameters), so a model created under
`empty_weights()` is loaded without ever holding its float weights; `torch.compile(model,
backend="fxquant")` then runs the stored weights as they are (passes/stored_weights.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES  # "F8_E4M3" → torch.float8_e4m3fn, ...
from safetensors.torch import load_file, save_file
from torch import Tensor, fx, nn
from torch.export import ExportedProgram

from fxquant.config import QuantConfig
from fxquant.footprint import dtype_name, memory_footprint, tied_names
from fxquant.hf_formats import HF_FORMATS
from fxquant.ops import LINEAR_SCHEMES
from fxquant.passes.find_linears import LinearSite
from fxquant.passes.plan_linears import Plan, PlannedLinear, skip_reason
from fxquant.passes.quantize_weights import quantize_parameter
from fxquant.passes.stored_weights import register_stored_weight

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "fxquant.json"
HF_CONFIG_FILE = "config.json"

Progress = Callable[[list[PlannedLinear]], Iterable[PlannedLinear]]


def _linear_site(name: str, linear: nn.Linear) -> LinearSite:
    """`linear` as the one-node graph `F.linear(x, weight)`, x of the weight's dtype and device, so
    that the plan pass's own `skip_reason` judges it as it would in a traced model."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(0, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
    node = graph.call_function(F.linear, (x, graph.get_attr("weight")))
    return LinearSite(node, "linear", f"{name}.weight", linear.weight, weight_is_kn=False, view_node=None)


def plan_modules(model: nn.Module, config: QuantConfig) -> Plan:
    """The plan of every nn.Linear of `model`, in module order, by the plan pass's rules; no tracing.

    Unlike the backend's plan there is no device fallback: a checkpoint stores the scheme asked for.
    """
    plan = Plan()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            site = _linear_site(name, module)
            reason = skip_reason(name, site, config)
            plan.append(PlannedLinear(name, site, None if reason else config.scheme, reason or ""))
    return plan


def _key(layer: str, attr: str) -> str:
    return f"{layer}.{attr}" if layer else attr


def _stored_scale(scale: Tensor) -> Tensor:
    """Per-channel scales [N] are stored [N, 1], as HF's FbgemmFp8Linear holds its weight_scale."""
    return scale.unsqueeze(-1) if scale.dim() == 1 else scale


def _check_config(config: QuantConfig) -> None:
    if LINEAR_SCHEMES[config.scheme].folds_weight_scale(config):
        raise ValueError(
            "fxquant: checkpoints of static fp8_tensorwise (static_activation_amax) are not supported; "
            "save with dynamic scales (static_activation_amax=None)"
        )


def quantize_state(
    model: nn.Module, config: QuantConfig | None = None, progress: Progress | None = None
) -> tuple[dict[str, Tensor], Plan]:
    """The tensors of `model`'s quantized checkpoint, and the plan that chose its layers.

    Each quantized layer's `weight` becomes its low-precision copy and gains a float32
    `weight_scale`; every other tensor of the state dict is kept as is. `progress` wraps the list
    of layers being quantized (e.g. with tqdm).
    """
    config = config or QuantConfig()
    _check_config(config)
    tensors = model.state_dict()
    on_meta = [name for name, t in tensors.items() if t.is_meta]
    if on_meta:
        raise ValueError(
            f"fxquant: cannot quantize weights on the meta device ({', '.join(on_meta[:5])}); load the model's weights first"
        )
    plan = plan_modules(model, config)
    for entry in (progress or iter)(plan.rewritten):
        w_q, w_scale = quantize_parameter(entry.layer, entry.site.weight, False, entry.scheme, config)
        tensors[_key(entry.layer, "weight")] = w_q
        tensors[_key(entry.layer, "weight_scale")] = _stored_scale(w_scale)
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
    _check_config(config)
    made = [entry for entry in plan.rewritten if entry.quantized is not None]  # not the stored weights
    lifted = {attr for entry in made for attr in (entry.quantized.weight_attr, entry.quantized.scale_attr)}
    tensors = {name: t for name, t in program.state_dict.items() if name not in lifted}
    before = memory_footprint(tensors)
    for entry in made:
        key = _key(entry.layer, "weight")
        if entry.site.weight_name != key or entry.site.weight_is_kn:
            raise ValueError(
                f"fxquant: layer '{entry.layer}' multiplies by '{entry.site.weight_name}', not by an nn.Linear weight "
                f"'{key}'; a checkpoint stores quantized nn.Linear layers only (skip the layer to save the program)"
            )
        tensors[key] = entry.quantized.w_q
        tensors[_key(entry.layer, "weight_scale")] = _stored_scale(entry.quantized.w_scale)
        before += entry.site.weight.numel() * entry.site.weight.element_size()
    return tensors, plan, config, before


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def save_quantized(
    model: nn.Module | ExportedProgram,
    directory: str | Path,
    config: QuantConfig | None = None,
    progress: Progress | None = None,
    hf_format: str = "fbgemm_fp8",
) -> dict:
    """Write a checkpoint of `model`, quantized, into `directory` (see the module docstring); the
    model is not modified. A program made by `fxquant.export` is written with the weights and the
    config it was quantized with (`config` must then be None), and without an HF config.json (it
    has no HF config). `hf_format` ("fbgemm_fp8" or "compressed-tensors") chooses the
    quantization_config written for HF models. Returns what fxquant.json holds, including the bytes
    of the float state dict before and of the stored tensors after quantization."""
    if hf_format not in HF_FORMATS:
        raise ValueError(f"fxquant: unknown hf_format {hf_format!r}; known: {', '.join(HF_FORMATS)}")
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})  # HF requires format "pt"
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
        "sha256": file_sha256(directory / WEIGHTS_FILE),
    }
    quantization_config = HF_FORMATS[hf_format](plan, config)
    if quantization_config is not None:
        metadata["quantization_config"] = quantization_config
        model_config = getattr(model, "config", None)
        if hasattr(model_config, "to_dict"):  # an HF model: make the directory an HF checkpoint
            _write_json(directory / HF_CONFIG_FILE, {
                **model_config.to_dict(),
                "architectures": [type(model).__name__],  # as save_pretrained writes it
                "quantization_config": quantization_config,
            })
    _write_json(directory / METADATA_FILE, metadata)
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
        if metadata.get("format_version") != FORMAT_VERSION:
            version = metadata.get("format_version")
            raise ValueError(f"format_version {version!r} unsupported (this fxquant reads {FORMAT_VERSION})")
        config = QuantConfig.from_options(metadata["config"])
        _check_config(config)
        for entry in metadata["plan"]:
            if entry["scheme"] is not None and entry["scheme"] not in LINEAR_SCHEMES:
                raise ValueError(f"layer '{entry['layer']}' has unknown scheme {entry['scheme']!r}")
    except KeyError as error:
        raise ValueError(f"fxquant: {path}: missing {error}") from error
    except (ValueError, TypeError) as error:
        raise ValueError(f"fxquant: {path}: {str(error).removeprefix('fxquant: ')}") from error
    return metadata, config


def _expected_tensors(
    path: Path, model: nn.Module, metadata: dict, config: QuantConfig
) -> tuple[dict[str, tuple[torch.dtype, tuple]], set[str]]:
    """What a checkpoint for `model` must hold, {name: (dtype, shape)}, and the names of the quantized tensors.

    For tensors left as they were, only floating-or-not of the dtype is fixed (the stored dtype wins).
    """
    expected = {name: (t.dtype, tuple(t.shape)) for name, t in model.state_dict().items()}
    quantized = set()
    modules = dict(model.named_modules())
    for entry in metadata["plan"]:
        if entry["scheme"] is None:
            continue
        layer = entry["layer"]
        module = modules.get(layer)
        if not isinstance(module, nn.Linear) or [module.out_features, module.in_features] != entry["shape"]:
            n, k = entry["shape"]
            raise ValueError(
                f"fxquant: {path}: tensor '{_key(layer, 'weight')}' was quantized from a {n} x {k} nn.Linear, but the "
                f"model's '{layer}' is {module!r}; is it a checkpoint for another architecture?"
            )
        w_q, w_scale = LINEAR_SCHEMES[entry["scheme"]].quantize_weight(torch.empty(entry["shape"], device="meta"), config)
        for attr, value in (("weight", w_q), ("weight_scale", _stored_scale(w_scale))):
            expected[_key(layer, attr)] = (value.dtype, tuple(value.shape))
            quantized.add(_key(layer, attr))
    return expected, quantized


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
        if name in quantized:
            dtype_fits, wanted = stored_dtype == dtype, str(dtype)
        else:
            dtype_fits = stored_dtype.is_floating_point == dtype.is_floating_point
            wanted = "floating point" if dtype.is_floating_point else "not floating point"
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
    """Put `value` in place of the parameter or buffer `name`; tied names get one shared Parameter."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attr)
    if old is None:
        module.register_buffer(attr, value)
        return
    if id(value) not in made:
        made[id(value)] = nn.Parameter(value, requires_grad=old.requires_grad and not quantized)
    module._parameters[attr] = made[id(value)]


def load_quantized(
    directory: str | Path, model: nn.Module, device: str | torch.device = "cpu", verify_checksum: bool = True
) -> nn.Module:
    """Load a checkpoint of `save_quantized` into `model` (its float or meta-device version) and return it.

    The checkpoint is checked first (readable file, known scheme, every tensor present with the
    dtype and shape the model needs, nothing extra); on any error the model is left unchanged.
    Quantized layers then hold `weight` as a low-precision nn.Parameter (requires_grad=False) and
    a float32 `weight_scale` buffer, registered as stored weights so that the fxquant backend and
    `fxquant.export` use them without quantizing again; every tensor is assigned, not copied, on `device`.
    `verify_checksum` compares the weights file with the SHA-256 recorded at save time (one read
    of the file), so changed data bytes are caught, not only a damaged header.
    """
    directory = Path(directory)
    metadata, config = read_metadata(directory)
    path = directory / WEIGHTS_FILE
    header = read_header(path)
    tied = metadata.get("tied", {})
    expected, quantized = _expected_tensors(path, model, metadata, config)
    _check_tensors(path, header, tied, expected, quantized)
    _check_no_meta_left(model, expected)
    if verify_checksum and metadata.get("sha256") not in (None, file_sha256(path)):
        raise ValueError(f"fxquant: {path}: SHA-256 differs from the one recorded in {METADATA_FILE}; the file was changed or corrupted")
    tensors = load_file(path, device=str(device))
    made: dict[int, Tensor] = {}
    for name in expected:
        _assign(model, name, tensors[tied.get(name, name)], name in quantized, made)
    for entry in metadata["plan"]:
        if entry["scheme"] is not None:  # torch.compile(backend="fxquant") then runs them as they are
            register_stored_weight(model.get_submodule(entry["layer"]), activation_scale_ub=config.activation_scale_ub)
    return model


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules created inside get their parameters on the meta device and their buffers as usual.

    `with torch.device("meta")` would also put non-persistent buffers (rotary frequencies, position
    ids) on meta, and no checkpoint holds them. Patches nn.Module.register_parameter meanwhile (not
    thread-safe); each parameter exists in real memory only until it is registered.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
