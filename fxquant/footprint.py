"""How many bytes a model or a state dict holds, counting tied tensors once (HF's
`get_memory_footprint`), and the dtype names checkpoints record."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


def tied_names(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """{name: earlier name} for each tensor that is the very same data as an earlier one (tied weights)."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, t in tensors.items():
        if t.is_meta or t.numel() == 0:
            continue
        identity = (t.device, t.data_ptr(), t.dtype, t.shape, t.stride())
        if identity in first:
            tied[name] = first[identity]
        else:
            first[identity] = name
    return tied


def nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * dtype.itemsize


def readable(count: int) -> str:
    """Bytes in binary units: 1536 → "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float8_e4m3fn → "float8_e4m3fn"."""
    return str(dtype).removeprefix("torch.")


def memory_footprint(model_or_state: nn.Module | Mapping[str, Tensor]) -> int:
    """Bytes of a module's parameters and buffers (as HF's get_memory_footprint counts them), or
    of a state dict's tensors; a tensor held under several names counts once."""
    if isinstance(model_or_state, nn.Module):
        tensors = [*model_or_state.parameters(), *model_or_state.buffers()]
    else:
        tied = tied_names(model_or_state)
        tensors = [t for name, t in model_or_state.items() if name not in tied]
    return sum(nbytes(t.dtype, t.shape) for t in tensors)
