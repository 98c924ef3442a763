"""An HF model directory as the command line reads it: its config.json, the transformers class that
config.json's `architectures` names (so that heads and key prefixes survive), the model loaded with
every tensor of the directory and no tensor left at random, and the names of the tensors its
weight files hold."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from fxquant.checkpoint import HF_CONFIG_FILE, METADATA_FILE, read_header


def _config_json(directory: Path) -> dict:
    path = directory / HF_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"fxquant: {directory}: no {HF_CONFIG_FILE}; is it an HF model directory (save_pretrained)?")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"fxquant: {path}: not JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"fxquant: {path}: not an HF config (a JSON object)")
    return content


def check_not_quantized(directory: Path) -> None:
    """`directory` holds float weights: no fxquant.json, no quantization_config in its config.json."""
    quantization_config = _config_json(directory).get("quantization_config")
    if quantization_config or (directory / METADATA_FILE).is_file():
        method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else None
        raise ValueError(
            f"fxquant: {directory} is already quantized ({method or METADATA_FILE}); quantize the float model it came from"
        )


def read_config(directory: Path):
    """The transformers config of an HF model directory (offline)."""
    import transformers

    _config_json(directory)  # a clear error for a missing or malformed config.json
    return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)


def model_class(config) -> tuple[type[nn.Module], str | None]:
    """The transformers class config.json's `architectures` names; without `architectures`, the
    base model of the config's type (what AutoModel loads) and a note saying that heads are dropped."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        if type(config) not in transformers.MODEL_MAPPING:
            raise ValueError(f"fxquant: config.json names no architectures and {type(config).__name__} has no base model")
        base = transformers.MODEL_MAPPING[type(config)]
        return base, f"config.json names no architectures: loading the base model {base.__name__}, without any head"
    name = architectures[0]
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"fxquant: config.json's architectures names {name!r}, which transformers {transformers.__version__} has no "
            "model class for (a model with custom code, or a newer transformers?)"
        )
    return cls, None


def load_model(directory: Path, cls: type[nn.Module], config) -> nn.Module:
    """The model of `directory` as a `cls`, in eval mode; an error if the weights do not fit the
    class: tensors it has no place for, or parameters the directory lacks (transformers would
    leave them at random)."""
    model, info = cls.from_pretrained(directory, config=config, local_files_only=True, output_loading_info=True)
    for kind, keys, why in (
        ("holds tensors", info["unexpected_keys"], f"that {cls.__name__} has no place for"),
        ("lacks tensors", info["missing_keys"], f"that {cls.__name__} needs (they would be random)"),
    ):
        if keys:
            names = sorted(keys)
            raise ValueError(
                f"fxquant: {directory} {kind} {why}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; "
                "does config.json's architectures name the class these weights were saved from?"
            )
    return model.eval()


def tensor_names(directory: Path) -> set[str]:
    """The names of the tensors in `directory`'s weight files, as transformers picks them (safetensors
    first, then pickle), from the headers or index files; tensors are memory-mapped, not read."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    if (directory / SAFE_WEIGHTS_NAME).is_file():
        return set(read_header(directory / SAFE_WEIGHTS_NAME))
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"fxquant: {directory / index}: no weight_map")
            return set(weight_map)
    if (directory / WEIGHTS_NAME).is_file():
        path = directory / WEIGHTS_NAME
        try:  # memory-mapped, unless the file is in torch's legacy (not zip) format, which cannot be
            return set(torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)))
        except (RuntimeError, pickle.UnpicklingError, EOFError) as error:  # torch's errors for a damaged file
            raise ValueError(f"fxquant: {path}: not a readable torch.save file ({error})") from error
    raise ValueError(f"fxquant: {directory}: no weights file ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME} or an index)")


def names_on_disk(model: nn.Module, tensors: dict[str, dict]) -> set[str]:
    """The names transformers' save_pretrained gives these tensors ({name: {"dtype", "shape"}}, as
    fxquant.json lists them): transformers 5 loads some architectures under other names than their
    files hold (ViT's `attention.attention.query` is `attention.q_proj` in the model; Qwen3-MoE's
    per-expert weights one fused tensor) and reverts that when it saves."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {name: torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]), device="meta") for name, entry in tensors.items()}
    return set(revert_weight_conversion(model, state))


def check_output_holds_input(
    inputs: set[str], dir_in: Path, dir_out: Path, model: nn.Module, tensors: dict[str, dict], tied: dict[str, str]
) -> None:
    """Every tensor of `dir_in` (`inputs`) is in the checkpoint `dir_out` under the same name, or the
    name transformers loads it under: stored, or tied to a stored one. Tensors the model computes
    instead of loading (non-persistent buffers such as position_ids, which older checkpoints hold)
    are the exception."""
    computed = set(dict(model.named_buffers())) - set(model.state_dict())
    stored = set(tensors) | names_on_disk(model, tensors)
    lost = sorted(inputs - stored - set(tied) - computed)
    if lost:
        raise ValueError(
            f"fxquant: {dir_out} lacks tensors of {dir_in}: {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}; "
            "the checkpoint is incomplete, do not use it"
        )
