"""bitsandbytes' 4-bit checkpoints as transformers writes and reads them (`load_in_4bit`), from and
into fxquant's nf4 / fp4 layers:

    save_bitsandbytes(model, "out", QuantConfig(scheme="nf4"))   # transformers loads "out" with bitsandbytes
    load_bitsandbytes("bnb-dir", model)                          # runs as stored nf4 / fp4 layers

Per quantized layer (bitsandbytes' QuantState.as_dict(packed=True) and Params4bit's data):

    <layer>.weight                                   uint8 [N K / 2, 1]   the packed codes
    <layer>.weight.absmax                            uint8 [N K / blocksize]   absmax codes (double quantization)
    <layer>.weight.quant_map                         float32 [16]         the NF4 / FP4 table
    <layer>.weight.nested_absmax                     float32 [ceil(N K / blocksize / 256)]
    <layer>.weight.nested_quant_map                  float32 [256]        the 8-bit dynamic map
    <layer>.weight.quant_state.bitsandbytes__<type>  uint8: JSON {quant_type, blocksize, dtype, shape,
                                                     nested_blocksize, nested_dtype, nested_offset}

and config.json's quantization_config (quant_method "bitsandbytes", load_in_4bit, bnb_4bit_quant_type,
bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, llm_int8_skip_modules: the linear layers left in
float). The bytes are fxquant's scheme tensors reshaped, so both directions are exact. Checkpoints
without double quantization (float32 absmax: transformers' default bnb_4bit_use_double_quant=False)
have no fxquant scheme and are refused, naming the layer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fxquant.checkpoint import copy_files
from fxquant.checkpoint_dir import created_atomically
from fxquant.checkpoint_layers import is_conv1d, plan_modules
from fxquant.checkpoint_metadata import read_header
from fxquant.config import QuantConfig
from fxquant.hf_formats import ignored_module, not_converted
from fxquant.ops.blockwise_4bit import NESTED_BLOCKSIZE, QUANT_TYPES, code_table, dynamic_map
from fxquant.scheme import get_scheme
from fxquant.stored_layers import make_stored

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
QUANT_STATE = "weight.quant_state.bitsandbytes__"
FLOAT_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _quantization_config(quant_type: str, options, skipped: list[str], model_dtype: torch.dtype) -> dict:
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
        "_load_in_8bit": False, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": options.compute_dtype or FLOAT_NAMES[model_dtype], "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": 6.0, "llm_int8_skip_modules": skipped, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def bnb_tensors(layer: str, tensors: dict[str, Tensor], quant_type: str, blocksize: int, shape: tuple[int, int],
                dtype: torch.dtype) -> dict[str, Tensor]:
    """One layer's scheme tensors under bitsandbytes' names and shapes."""
    state = {"quant_type": quant_type, "blocksize": blocksize, "dtype": FLOAT_NAMES[dtype], "shape": list(shape),
             "nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
             "nested_offset": tensors["weight_offset"].item()}
    packed_state = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return {
        f"{layer}.weight": tensors["weight"].reshape(-1, 1).contiguous(),
        f"{layer}.weight.absmax": tensors["weight_absmax"].reshape(-1).contiguous(),
        f"{layer}.weight.quant_map": code_table(quant_type),
        f"{layer}.weight.nested_absmax": tensors["weight_nested_absmax"].contiguous(),
        f"{layer}.weight.nested_quant_map": dynamic_map(),
        f"{layer}.{QUANT_STATE}{quant_type}": packed_state,
    }


def save_bitsandbytes(model: nn.Module, directory: str | os.PathLike, config: QuantConfig | None = None,
                      extra_files: Iterable[str | os.PathLike] = ()) -> dict:
    """Write an HF model (float weights, a `config`) quantized by `config` (nf4 or fp4, one quant type,
    blocksize and compute dtype for all its quantized layers: transformers' one quantization_config)
    in bitsandbytes' serialized layout into a new `directory` (refused if it exists; it appears whole,
    in one rename: checkpoint_dir.created_atomically), with copies of `extra_files` (the command
    line's tokenizer files, ...); returns the quantization_config. Layers
    stored as nf4 / fp4 (load_quantized, load_bitsandbytes) are written as they are; layers
    transformers keeps in float32 (the class's `_keep_in_fp32_modules`: T5's `wo`) stay float and go
    into llm_int8_skip_modules; a Conv1D (GPT-2) is written as the Linear4bit transformers makes of it.
    Refuses, before writing anything, a plan with another scheme or with layers of different options."""
    config = config or QuantConfig(scheme="nf4")
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        raise FileExistsError(f"fxquant: {directory} exists; save_bitsandbytes writes a new directory")
    if getattr(model, "config", None) is None:
        raise ValueError("fxquant: save_bitsandbytes needs an HF model (its config goes to config.json)")
    plan = plan_modules(model, config)  # leaves the layers transformers keeps in float32 float
    stored = next((entry for entry in plan.rewritten if not_converted(entry.layer, plan.float32_modules)), None)
    if stored is not None:  # loaded from a checkpoint that quantized it
        raise ValueError(f"fxquant: cannot save {stored.layer} in bitsandbytes' layout: it is stored {stored.scheme}, "
                         f"and transformers keeps it in float32 ({type(model).__name__}._keep_in_fp32_modules)")
    quantized = plan.rewritten
    kinds = {(entry.scheme, entry.options) for entry in quantized}
    for entry in quantized:
        problem = (f"scheme {entry.scheme} (bitsandbytes' layout holds nf4 or fp4)" if entry.scheme not in QUANT_TYPES
                   else f"its options {entry.options} differ from another layer's (one quantization_config)" if len(kinds) > 1
                   else None)
        if problem is not None:
            raise ValueError(f"fxquant: cannot save {entry.layer} in bitsandbytes' layout: {problem}")
    if not quantized:
        raise ValueError("fxquant: no layer is quantized under this config; nothing to save in bitsandbytes' layout")
    (quant_type, options), = kinds

    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():  # tied weights: transformers ties them again on loading
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor
    model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with torch.no_grad():
        for entry in quantized:
            module = model.get_submodule(entry.layer)
            if entry.stored is None:  # a Conv1D's [K, N] weight as the Linear4bit transformers makes of it: [N, K]
                weight = module.weight.detach().t().contiguous() if is_conv1d(module) else module.weight.detach()
                tensors, dtype = get_scheme(quant_type).quantize(weight, options), module.weight.dtype
                shape = tuple(weight.shape)
            else:  # stored nf4 / fp4 (load_quantized, load_bitsandbytes): its bytes as they are, [N, K / 2]
                tensors, dtype = {"weight": module.weight.detach(), **entry.stored}, model_dtype
                shape = (module.weight.shape[0], 2 * module.weight.shape[1])
                for name in [name for name in state if name.startswith(f"{entry.layer}.weight_")]:
                    del state[name]
            del state[f"{entry.layer}.weight"]
            state.update(bnb_tensors(entry.layer, tensors, quant_type, options.blocksize, shape, dtype))
    skipped = [ignored_module(entry) for entry in plan.skipped]
    quantization_config = _quantization_config(quant_type, options, skipped, model_dtype)
    hf_config = {**model.config.to_dict(), "quantization_config": quantization_config}

    with created_atomically(directory) as staging:
        save_file({name: t.detach().cpu().contiguous() for name, t in state.items()}, staging / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        copy_files([Path(path) for path in extra_files], staging)
    return quantization_config


def _weights_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (directory / WEIGHTS_FILE).exists():
        return [directory / WEIGHTS_FILE]
    raise FileNotFoundError(f"fxquant: {directory} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")


def _read_all(directory: Path, device: torch.device | str) -> dict[str, Tensor]:
    tensors = {}
    for path in _weights_files(directory):
        read_header(path)  # a truncated or tampered file is refused by name
        with safe_open(path, "pt", device=str(device)) as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _scheme_tensors(layer: str, module: nn.Module, stored: dict[str, Tensor], quant_type: str) -> tuple[dict[str, Tensor], int]:
    """A layer's fxquant nf4 / fp4 tensors from bitsandbytes' (popped from `stored`), and its blocksize."""
    state = json.loads(bytes(stored.pop(f"{layer}.{QUANT_STATE}{quant_type}").cpu().tolist()).decode("utf-8"))
    k, n = module.weight.shape if is_conv1d(module) else (module.in_features, module.out_features)
    blocksize = state["blocksize"]
    names = {part: f"{layer}.weight{part}" for part in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")}
    problem = (
        "no double quantization (float32 absmax; fxquant's nf4 / fp4 hold 8-bit absmax codes)"
        if names[".nested_absmax"] not in stored else
        f"its shape {state['shape']} is not the layer's [{n}, {k}]" if list(state["shape"]) != [n, k] else
        f"K={k} is not a multiple of its blocksize {blocksize}" if k % blocksize else
        f"its nested blocksize is {state['nested_blocksize']}, not {NESTED_BLOCKSIZE}" if state["nested_blocksize"] != NESTED_BLOCKSIZE else
        f"its quant_map is not bitsandbytes' {quant_type} table" if not torch.equal(stored[names[".quant_map"]].cpu(), code_table(quant_type)) else
        "its nested_quant_map is not bitsandbytes' dynamic map" if not torch.equal(stored[names[".nested_quant_map"]].cpu(), dynamic_map()) else
        None
    )
    if problem is not None:
        raise ValueError(f"fxquant: {layer}: cannot run this bitsandbytes 4-bit weight as {quant_type}: {problem}")
    weight, absmax, nested = (stored.pop(names[part]) for part in ("", ".absmax", ".nested_absmax"))
    del stored[names[".quant_map"]], stored[names[".nested_quant_map"]]
    offset = torch.tensor(state["nested_offset"], dtype=torch.float32, device=weight.device)
    return {"weight": weight.reshape(n, k // 2), "weight_absmax": absmax.reshape(n, k // blocksize),
            "weight_nested_absmax": nested, "weight_offset": offset}, blocksize


def load_bitsandbytes(directory: str | os.PathLike, model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Load a bitsandbytes 4-bit checkpoint (transformers' save_pretrained of a load_in_4bit model, or
    save_bitsandbytes) into `model` (its float architecture, e.g. built under fxquant.empty_weights()):
    each 4-bit layer becomes a stored nf4 / fp4 layer with the same bytes, run by fxquant's op eagerly
    and compiled; the other tensors are assigned as they are. Returns the model."""
    directory = Path(directory)
    quantization_config = json.loads((directory / CONFIG_FILE).read_text()).get("quantization_config") or {}
    if quantization_config.get("quant_method") != "bitsandbytes" or not quantization_config.get("load_in_4bit"):
        raise ValueError(f"fxquant: {directory / CONFIG_FILE} does not describe a bitsandbytes 4-bit checkpoint")
    compute_dtype = quantization_config.get("bnb_4bit_compute_dtype")
    stored = _read_all(directory, device)
    for name, module in model.named_modules():
        quant_type = next((q for q in QUANT_TYPES if f"{name}.{QUANT_STATE}{q}" in stored), None)
        if quant_type is None:
            continue
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(f"fxquant: {name} holds a bitsandbytes 4-bit weight but is a {type(module).__name__}, "
                             "not nn.Linear or Conv1D")
        tensors, blocksize = _scheme_tensors(name, module, stored, quant_type)
        options = get_scheme(quant_type).options({"blocksize": blocksize, "compute_dtype": compute_dtype})
        module.weight = nn.Parameter(tensors.pop("weight"), requires_grad=False)
        for attr, tensor in tensors.items():
            module.register_buffer(attr, tensor)
        make_stored(module, quant_type, options, name)
    leftover = [name for name in stored if ".weight.quant_state." in name]
    if leftover:
        raise ValueError(f"fxquant: 4-bit weights of layers the model does not have: {', '.join(leftover[:5])}")
    missing, unexpected = model.load_state_dict(stored, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"fxquant: {directory}: tensors the model does not have: {', '.join(unexpected[:5])}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"fxquant: {directory} does not hold {', '.join(on_meta[:5])}")
    return model
