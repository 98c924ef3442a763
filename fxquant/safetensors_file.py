"""A safetensors file written tensor by tensor: its header is computed from the tensors' names,
dtypes and shapes before any data exists, so each tensor is written at its own offset when it is
made (in any order, by any thread) and the file never has to be held in memory whole.

    layout = FileLayout.of({"a.weight": (torch.float8_e4m3fn, (64, 64)), ...})
    with open(path, "xb") as file:
        layout.start(file)                       # header, and the file at its final size
        layout.write(file, "a.weight", tensor)   # os.pwrite at the tensor's offset

The layout is safetensors' own (8-byte little-endian header length, JSON header padded with
spaces to 8 bytes, data): tensors lie in order of decreasing dtype size, so every tensor is aligned
to its dtype as safetensors' own writer aligns them, and otherwise in the order given.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES  # "F8_E4M3" → torch.float8_e4m3fn, ...
from torch import Tensor

from fxquant.footprint import nbytes

DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
FORMAT_METADATA = {"format": "pt"}  # transformers requires format "pt"


@dataclass(frozen=True)
class FileLayout:
    """Where each tensor of one safetensors file lies: {name: (dtype, shape, begin)}, and the header."""

    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]]
    header: bytes

    @classmethod
    def of(cls, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> FileLayout:
        order = sorted(tensors, key=lambda name: -tensors[name][0].itemsize)  # stable: the given order otherwise
        placed, entries, offset = {}, {"__metadata__": FORMAT_METADATA}, 0
        for name in order:
            dtype, shape = tensors[name]
            size = nbytes(dtype, shape)
            entries[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            placed[name] = (dtype, tuple(shape), offset)
            offset += size
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return cls(placed, struct.pack("<Q", len(text)) + text)

    @property
    def data_size(self) -> int:
        return sum(nbytes(dtype, shape) for dtype, shape, _ in self.tensors.values())

    @property
    def size(self) -> int:
        return len(self.header) + self.data_size

    def start(self, file) -> None:
        """Write the header into a new, empty `file` and give it its final size."""
        file.write(self.header)
        file.truncate(self.size)
        file.flush()

    def write(self, file, name: str, tensor: Tensor) -> None:
        """Write `tensor` (on the CPU) at `name`'s offset; its dtype and shape must be the layout's."""
        dtype, shape, begin = self.tensors[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"fxquant: tensor '{name}' is {tensor.dtype} {list(tensor.shape)}, its file expects {dtype} {list(shape)}")
        if tensor.numel() == 0:
            return
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        position = len(self.header) + begin
        while data:
            written = os.pwrite(file.fileno(), data, position)
            data, position = data[written:], position + written
