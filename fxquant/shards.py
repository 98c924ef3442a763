"""How a checkpoint's tensors are split into safetensors files, as transformers' save_pretrained
splits them (huggingface_hub's split_state_dict_into_shards): tensors in order, a new shard when
the next would take the current one over `max_shard_size`, a tensor larger than that alone in its
own. One shard is `model.safetensors`; more are `model-0000k-of-0000n.safetensors` plus
`model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {name: file}})."""

from __future__ import annotations

import re

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' save_pretrained default (modeling_utils, transformers 5.x)
DEFAULT_MAX_SHARD_SIZE = "50GB"
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB" (decimal units, as huggingface_hub's
    parse_size_to_int reads them); a ValueError names what it could not read."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]B)\s*", str(size), re.IGNORECASE)
        if match is None:
            raise ValueError(f"fxquant: max_shard_size {size!r} is not a number of bytes nor a size such as '5GB' (KB, MB, GB, TB)")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"fxquant: max_shard_size must be positive, got {size!r}")
    return value


def split_into_shards(sizes: dict[str, int], max_shard_size: int | str) -> list[list[str]]:
    """The names of `sizes` ({name: bytes}, in order), grouped into shards by transformers' rule."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes.items():
        if size > limit:
            shards.append([name])
            continue
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    """The files of `count` shards: ["model.safetensors"] or "model-00001-of-0000n.safetensors", ..."""
    if count == 1:
        return [WEIGHTS_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def index_content(weight_map: dict[str, str], total_size: int) -> dict:
    """model.safetensors.index.json as transformers writes and reads it."""
    return {"metadata": {"total_size": total_size}, "weight_map": weight_map}
