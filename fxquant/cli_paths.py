"""The command line's checks of its directories, made before anything is read: the input is a
directory; the output is not the input, does not lie inside it or hold it, and shares no file with
it. Files are compared by identity (device, inode) after following links, so a symlink or a hard
link to an input file counts as that file: an HF hub cache snapshot's files are symlinks into
`blobs/`, shared by every snapshot of the model."""

from __future__ import annotations

import os
from pathlib import Path

from fxquant.checkpoint import METADATA_FILE
from fxquant.checkpoint_dir import check_replaceable


def check_input_dir(directory: Path) -> None:
    """`directory` exists and is a directory."""
    if not directory.exists():
        raise ValueError(f"fxquant: {directory}: no such directory")
    if not directory.is_dir():
        raise ValueError(f"fxquant: {directory}: is a file, not a model directory")


def _file_identities(directory: Path) -> dict[tuple[int, int], Path]:
    """{(device, inode): path} of every file under `directory`, links followed to what they point at."""
    identities = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = Path(parent, name)
            try:
                stat = path.stat()
            except OSError:  # a dangling link points at no file
                continue
            identities[(stat.st_dev, stat.st_ino)] = path
    return identities


def check_output_dir(dir_in: Path, dir_out: Path, overwrite: bool) -> None:
    """Refuse an output that would write over the input, or replace a directory that is not an
    fxquant checkpoint unless `overwrite` (as save_quantized would, but before the model is read)."""
    check_input_dir(dir_in)
    real_in, real_out = dir_in.resolve(), dir_out.resolve()
    if real_out == real_in:
        raise ValueError(f"fxquant: {dir_out} is the input directory {dir_in}; write the checkpoint to a new directory")
    if real_out.is_relative_to(real_in):
        raise ValueError(f"fxquant: {dir_out} lies inside the input directory {dir_in}; write the checkpoint elsewhere")
    if real_in.is_relative_to(real_out):
        raise ValueError(f"fxquant: {dir_out} holds the input directory {dir_in}; write the checkpoint elsewhere")
    if dir_out.is_dir():
        _check_no_shared_files(dir_in, dir_out)
    check_replaceable(dir_out, METADATA_FILE, overwrite)


def _check_no_shared_files(dir_in: Path, dir_out: Path) -> None:
    inputs = _file_identities(dir_in)
    shared = sorted(str(path) for identity, path in _file_identities(dir_out).items() if identity in inputs)
    if shared:
        raise ValueError(
            f"fxquant: {dir_out} holds files of the input {dir_in} (links to the same data: "
            f"{', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''}); write the checkpoint to a new directory"
        )
