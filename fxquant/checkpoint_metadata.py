"""A checkpoint's fxquant.json: its format, read and checked on its own terms before anything else
is read, and what a save records in it.

Format 2 (this fxquant writes it):
    format_version  2
    config          the QuantConfig (rules and scheme_options included)
    plan            each layer: shape [N, K], scheme or null, note, bytes {before, after} of its weight
    tensors         each stored tensor: dtype, shape, and the weights file that holds it
    tied            {name: name it is stored as} (tied embeddings)
    bytes           {before, after}: the float state dict and the stored tensors
    sha256          {weights file: its SHA-256}
    files           every file of the directory (the manifest checkpoint_dir.py replaces by)
    quantization_config   what config.json carries, if any
Format 1 (one model.safetensors, "sha256" a string, no per-layer bytes) is still read: it is
upgraded in memory to format 2's shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES  # "F8_E4M3" → torch.float8_e4m3fn, ...

from fxquant.checkpoint_schema import METADATA, METADATA_V1, mismatch
from fxquant.config import QuantConfig
from fxquant.scheme import SCHEMES, get_scheme
from fxquant.shards import WEIGHTS_FILE

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
METADATA_FILE = "fxquant.json"
HF_CONFIG_FILE = "config.json"


def tensor_key(layer: str, attr: str) -> str:
    return f"{layer}.{attr}" if layer else attr


def check_config(config: QuantConfig) -> None:
    """Checkpoints hold tensors, not graphs: a scheme that folds its tensors into constants cannot be saved."""
    for scheme in config.schemes_in_use():
        if get_scheme(scheme).folds_tensors(config.options_for(scheme)):
            raise ValueError(
                f"fxquant: checkpoints of {scheme} with tensors folded into the graph (static fp8_tensorwise: "
                "static_activation_amax) are not supported; save with dynamic scales (static_activation_amax=None)"
            )


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
    except FileNotFoundError as error:
        raise ValueError(f"fxquant: {path}: no such file") from error
    except KeyError as error:
        raise ValueError(f"fxquant: {path} holds a tensor of dtype {error}, which torch has no dtype for") from error


def _upgraded(metadata: dict) -> dict:
    """A format-1 fxquant.json in format 2's shape: every tensor in model.safetensors."""
    return {
        **metadata,
        "format_version": FORMAT_VERSION,
        "tensors": {name: {**entry, "file": WEIGHTS_FILE} for name, entry in metadata["tensors"].items()},
        "sha256": {WEIGHTS_FILE: metadata["sha256"]},
    }


def read_metadata(directory: str | Path) -> tuple[dict, QuantConfig]:
    """fxquant.json of a checkpoint directory, checked (format 1 upgraded to 2's shape), and the QuantConfig it names."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"fxquant: {path} not found; is {directory} a checkpoint written by fxquant.save_quantized?")
    try:
        metadata = json.loads(path.read_text())
    except ValueError as error:  # not UTF-8 or not JSON
        raise ValueError(f"fxquant: {path}: not a JSON file ({error})") from error
    problem = metadata_problem(metadata)
    if problem:
        raise ValueError(f"fxquant: {path}: {problem}")
    if metadata["format_version"] == 1:
        metadata = _upgraded(metadata)
    try:
        config = QuantConfig.from_options(metadata["config"])
        check_config(config)
    except ValueError as error:
        raise ValueError(f"fxquant: {path}: {str(error).removeprefix('fxquant: ')}") from error
    return metadata, config


def metadata_problem(metadata: object) -> str | None:
    """What is wrong with fxquant.json on its own terms (version, structure, schemes, a plan or tied
    map that its tensor table does not bear out, a tensor in a file it does not list), or None."""
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if version not in READ_VERSIONS:
        return f"format_version {version!r} unsupported (this fxquant reads {' and '.join(map(str, READ_VERSIONS))})"
    problem = mismatch(metadata, METADATA if version == FORMAT_VERSION else METADATA_V1, "")
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
        if "expert_names" in entry and "experts" not in entry:
            return f"layer '{layer}' has expert_names without experts"
        if scheme is not None and "experts" in entry and "expert_names" not in entry:
            return f"layer '{layer}' is a quantized expert weight without expert_names"
        if scheme is not None and "experts" in entry:  # stored one tensor per expert and part (fxquant/checkpoint_experts.py)
            keys = [f"{part.format(e=e)}.{attr}" for attr in names for e in range(entry["experts"]) for part in entry["expert_names"]]
        else:
            keys = [tensor_key(layer, attr) for attr in names]
        absent = [key for key in keys if key not in {*table, *tied}]
        if scheme is not None and absent:
            return f"the plan quantizes layer '{layer}' ({scheme}), but the tensor table has no '{absent[0]}'"
    for alias, target in tied.items():
        if alias in table or target not in table:
            return f"tied maps '{alias}' to '{target}', but the tensor table {'holds' if alias in table else 'has no'} '{alias if alias in table else target}'"
    if version == FORMAT_VERSION:
        for name, entry in table.items():
            if entry["file"] not in metadata["sha256"]:
                return f"tensor '{name}' is in {entry['file']!r}, which sha256 does not list"
        unused = sorted(set(metadata["sha256"]) - {entry["file"] for entry in table.values()})
        if unused and table:
            return f"sha256 lists {unused[0]!r}, which holds no tensor of the table"
    return None
