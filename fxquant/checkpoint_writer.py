"""The weights files of a checkpoint, written piece by piece: each `Piece` names the tensors it
makes (their dtypes and shapes known beforehand) and makes them when asked, so that the shards and
their headers are laid out first (fxquant/shards.py, fxquant/safetensors_file.py) and no more than
`workers` pieces are ever in memory at once.

`save_quantized` gives one piece per tensor it holds already; `fxquant quantize` gives one piece per
input tensor, which reads it and quantizes it (fxquant/streaming_quantize.py). Both write the same
bytes for the same tensors: the layout depends on names, dtypes and shapes only (tensors in natural
order of their names: "layers.2" before "layers.10", a layer's weight and scale side by side).

Workers are threads: reading a tensor, quantizing it (torch releases the GIL in its kernels) and
`os.pwrite` run in parallel, and the tensors stay in one process instead of crossing pipes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fxquant.footprint import nbytes
from fxquant.freed_memory import release_freed_memory
from fxquant.safetensors_file import FileLayout
from fxquant.shards import INDEX_FILE, index_content, shard_names, split_into_shards


@dataclass(frozen=True)
class Piece:
    """One step of writing: the tensors it makes ({name: (dtype, shape)}, in file order), `make()`
    returning them (CPU tensors, by name) and the bytes of input it stands for (the progress bar)."""

    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    make: Callable[[], dict[str, Tensor]]
    source_bytes: int = 0


@dataclass(frozen=True)
class WrittenWeights:
    """What `write_weights` wrote: each tensor's file, each file's SHA-256, and the index (if sharded)."""

    file_of: dict[str, str]
    sha256: dict[str, str]
    index: str | None


def natural_order(name: str) -> tuple:
    """Names in the order a reader expects: numbers as numbers ("layers.2" before "layers.10"), so that
    the files depend on the tensors alone, not on the order a model or a program lists them in."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_tensors(piece: Piece, layouts: dict[str, FileLayout], files: dict, file_of: dict[str, str]) -> None:
    tensors = piece.make()
    if list(tensors) != list(piece.layout):
        raise RuntimeError(f"fxquant: a piece made {sorted(tensors)}, not the tensors it declared {sorted(piece.layout)}")
    for name, tensor in tensors.items():
        layouts[file_of[name]].write(files[file_of[name]], name, tensor)


def _write_piece(piece: Piece, layouts: dict[str, FileLayout], files: dict, file_of: dict[str, str]) -> int:
    _write_tensors(piece, layouts, files, file_of)
    release_freed_memory()  # the piece's tensors are gone: keep the peak at the pieces in flight
    return piece.source_bytes


def write_weights(
    directory: Path, pieces: list[Piece], max_shard_size: int | str, workers: int = 1,
    advance: Callable[[int], object] | None = None,
) -> WrittenWeights:
    """Write `pieces` into new safetensors files in `directory`: one `model.safetensors`, or shards
    of at most `max_shard_size` bytes each (a larger tensor alone in its own) and their index.
    `workers` pieces are made at once; `advance(bytes)` is called as each is written."""
    if workers < 1:
        raise ValueError(f"fxquant: workers must be at least 1, got {workers}")
    declared = {name: spec for piece in pieces for name, spec in piece.layout.items()}
    if len(declared) != sum(len(piece.layout) for piece in pieces):
        raise RuntimeError("fxquant: two pieces declare the same tensor")
    declared = {name: declared[name] for name in sorted(declared, key=natural_order)}
    shards = split_into_shards({name: nbytes(*spec) for name, spec in declared.items()}, max_shard_size)
    names = shard_names(len(shards))
    file_of = {name: file for file, shard in zip(names, shards) for name in shard}
    layouts = {file: FileLayout.of({name: declared[name] for name in shard}) for file, shard in zip(names, shards)}
    files = {file: open(directory / file, "xb") for file in names}  # noqa: SIM115 (closed below)
    try:
        for file, layout in layouts.items():
            layout.start(files[file])
        if workers == 1:
            for piece in pieces:
                done = _write_piece(piece, layouts, files, file_of)
                if advance:
                    advance(done)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="fxquant-write") as pool:
                pending = set()
                for piece in pieces:
                    if len(pending) >= workers:  # memory bound: at most `workers` pieces in flight
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in finished:
                            done = future.result()
                            if advance:
                                advance(done)
                    pending.add(pool.submit(_write_piece, piece, layouts, files, file_of))
                for future in wait(pending).done:
                    done = future.result()
                    if advance:
                        advance(done)
    finally:
        for file in files.values():
            file.close()
    index = None
    if len(names) > 1:
        index = INDEX_FILE
        total = sum(layout.data_size for layout in layouts.values())
        with open(directory / INDEX_FILE, "x") as file:
            file.write(json.dumps(index_content(file_of, total), indent=2) + "\n")
    return WrittenWeights(file_of, {file: file_sha256(directory / file) for file in names}, index)
