"""A checkpoint directory replaced whole and in one step: a save never leaves a half-written or
mixed directory behind, and never writes into a file that was there (nor through a symlink).

Every file is written into a fresh hidden directory next to the target, on the same filesystem
(`.<name>.fxquant-tmp-<host>-<pid>-<random>`), flushed to disk, then exchanged with the target in
one rename (Linux `renameat2(RENAME_EXCHANGE)`), so the target path holds the complete old or the
complete new checkpoint at every instant; the old one is deleted afterwards. Where the exchange is
not available, the old directory is renamed aside (`.<name>.fxquant-old-...`) and deleted only
once the new one is in place. A save that dies leaves its hidden directory; the next save into
the same place deletes the ones whose process, on this host, is gone.

A directory is replaced only if it is empty or a checkpoint whose manifest (fxquant.json's
"files") lists every file it holds, unless the caller says overwrite. The checkpoint is a new
directory each time, made with the usual mode (umask): a shell sitting in the old one must `cd`
into it again. `created_atomically` stages the same way a directory that must not exist yet (the
bitsandbytes layout's save), moved into place in one rename.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

_STAGING, _ASIDE = "fxquant-tmp", "fxquant-old"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_RENAMEAT2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28; None elsewhere
if _RENAMEAT2 is not None:
    _RENAMEAT2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _RENAMEAT2.restype = ctypes.c_int


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _hidden_sibling(directory: Path, kind: str) -> Path:
    return directory.with_name(f".{directory.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_stale(directory: Path) -> None:
    """Delete the hidden directories that earlier saves into `directory` left when they died:
    only ours by name, made on this host by a process that no longer runs. An aside copy (the old
    checkpoint) goes only when `directory` exists, i.e. when the new one got into place."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.({_STAGING}|{_ASIDE})-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}")
    for sibling in directory.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if not match or sibling.is_symlink() or not sibling.is_dir():
            continue
        kind, host, pid = match.group(1), match.group(2), int(match.group(3))
        if host == _host() and not _process_alive(pid) and (kind == _STAGING or directory.is_dir()):
            shutil.rmtree(sibling)


def listed_files(manifest: Path) -> list[str]:
    """The "files" a checkpoint's manifest lists; [] if it is missing, unreadable or lists none."""
    try:
        files = json.loads(manifest.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    return files if isinstance(files, list) and all(isinstance(name, str) for name in files) else []


def check_replaceable(directory: Path, manifest: str, overwrite: bool) -> None:
    """Refuse (ValueError) to replace `directory` unless it is missing, empty, a checkpoint whose
    `manifest` lists every file it holds, or `overwrite` is set; a symlink is always refused."""
    if directory.is_symlink():
        raise ValueError(
            f"fxquant: {directory} is a symbolic link (to {os.readlink(directory)}); a save replaces the directory "
            "it is given and never writes through a link: give the directory itself"
        )
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"fxquant: {directory} exists and is not a directory")
    unlisted = sorted(set(os.listdir(directory)) - set(listed_files(directory / manifest)))
    if unlisted and not overwrite:
        raise ValueError(
            f"fxquant: {directory} is not empty and is not an fxquant checkpoint (holds "
            f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}); pass overwrite=True (`fxquant quantize --overwrite`) to replace it"
        )


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the system or the filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_in(staging: Path, directory: Path) -> None:
    """Make `staging` `directory`; the old `directory`, if any, is deleted once the new one is in place."""
    if not directory.exists():
        os.rename(staging, directory)
    elif _exchange(staging, directory):
        shutil.rmtree(staging)  # now the old checkpoint
    else:
        aside = _hidden_sibling(directory, _ASIDE)
        os.rename(directory, aside)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(aside, directory)
            raise
        shutil.rmtree(aside)
    _fsync(directory.parent)


def _flush(staging: Path) -> None:
    """The staged files and the directory's entries, on disk."""
    for name in os.listdir(staging):
        _fsync(staging / name)
    _fsync(staging)


@contextlib.contextmanager
def _staging_beside(directory: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `directory` to write into (the ones dead saves left removed first);
    deleted when the block ends, unless the block moved it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory)
    staging = _hidden_sibling(directory, _STAGING)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already unless the save failed


@contextlib.contextmanager
def replaced_atomically(directory: Path, manifest: str, overwrite: bool = False) -> Iterator[Path]:
    """A fresh directory to write a checkpoint into; when the block ends without an error it
    replaces `directory` in one step (see the module docstring), and it must then hold exactly
    the files its `manifest` lists. On any error it is deleted and `directory` is as it was."""
    directory = Path(os.path.abspath(directory))  # "." and "out/.." have no name to put a sibling beside
    check_replaceable(directory, manifest, overwrite)
    with _staging_beside(directory) as staging:
        yield staging
        written = sorted(os.listdir(staging))
        if sorted(listed_files(staging / manifest)) != written:
            raise RuntimeError(f"fxquant: {manifest} does not list exactly the files written ({', '.join(written)})")
        _flush(staging)
        check_replaceable(directory, manifest, overwrite)  # again: it may have changed while we wrote
        _swap_in(staging, directory)


def _refuse_existing(directory: Path) -> None:
    if directory.exists() or directory.is_symlink():
        raise FileExistsError(f"fxquant: {directory} exists; this save writes a new directory")


@contextlib.contextmanager
def created_atomically(directory: str | os.PathLike) -> Iterator[Path]:
    """A fresh directory to write into that becomes `directory` in one rename when the block ends
    without an error; `directory` must not exist, before the block or at its end (FileExistsError).
    On any error it is deleted; a save killed midway leaves it hidden, for the next save beside it
    to delete (as `replaced_atomically`'s)."""
    directory = Path(os.path.abspath(directory))
    _refuse_existing(directory)
    with _staging_beside(directory) as staging:
        yield staging
        _flush(staging)
        _refuse_existing(directory)  # again: it may have appeared while we wrote
        os.rename(staging, directory)
        _fsync(directory.parent)
