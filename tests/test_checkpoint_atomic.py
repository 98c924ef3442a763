"""Checkpoint directories replaced whole and atomically (fxquant/checkpoint_dir.py): a save that
fails or is killed at any point leaves the old checkpoint loadable and bit for bit as it was; a
re-save leaves no file of the earlier save; directories that are not fxquant checkpoints are
refused unless overwrite; nothing is ever written through a symlink."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fxquant import checkpoint_dir
from fxquant.checkpoint import load_quantized, quantize_state, save_quantized
from fxquant.config import QuantConfig
from tests.models import MLP, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent


def mlp(seed: int = 0, dim: int = 128) -> MLP:
    torch.manual_seed(seed)
    return MLP(dim=dim, hidden=2 * dim, vocab=32).eval()


def contents(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (symlinks read through) by relative path, with its bytes."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def hidden_siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))


def assert_loads_as(directory: Path, model_factory, saved: dict[str, bytes]) -> None:
    """`directory` holds exactly the files `saved` holds, bit for bit, and loads."""
    assert contents(directory) == saved
    load_quantized(directory, model_factory())


# What a directory holds after a re-save: exactly the new save's files.


RESAVES = {
    "fp8 llama, then tensorwise llama (no config.json)": (tiny_llama, QuantConfig(), tiny_llama, QuantConfig(scheme="fp8_tensorwise")),
    "fp8 llama, then a plain MLP": (tiny_llama, QuantConfig(), mlp, QuantConfig()),
    "MLP, then fp8 llama": (mlp, QuantConfig(scheme="fp8_blockwise"), tiny_llama, QuantConfig()),
    "int8 llama, then fp8 llama": (tiny_llama, QuantConfig(scheme="int8"), tiny_llama, QuantConfig()),
}


@pytest.mark.parametrize("case", list(RESAVES))
def test_resave_leaves_only_the_new_files(tmp_path, case):
    first, first_config, second, second_config = RESAVES[case]
    out = tmp_path / "out"
    save_quantized(first(), out, first_config)
    metadata = save_quantized(second(), out, second_config)
    assert sorted(os.listdir(out)) == sorted(metadata["files"])
    assert ("config.json" in metadata["files"]) == (second is tiny_llama and second_config.scheme != "fp8_tensorwise")
    assert hidden_siblings(out) == []
    expected, _ = quantize_state(second(), second_config)
    loaded = load_quantized(out, second()).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)) for name, t in expected.items())


def test_missing_and_empty_directories_are_written(tmp_path):
    for out in (tmp_path / "a" / "b" / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        metadata = save_quantized(mlp(), out)
        assert sorted(os.listdir(out)) == sorted(metadata["files"]) == ["fxquant.json", "model.safetensors"]
        assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask()), "a checkpoint directory gets the usual mode"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Refused: a non-empty directory that is not exactly an fxquant checkpoint, unless overwrite.


def foreign_text_file(out):
    (out / "notes.txt").write_text("mine")
    return "notes.txt"


def hf_model_directory(out):
    tiny_llama().save_pretrained(out)
    return "config.json"


def checkpoint_plus_a_file(out):
    save_quantized(mlp(), out)
    (out / "tokenizer.json").write_text("{}")
    return "tokenizer.json"


def checkpoint_plus_a_directory(out):
    save_quantized(mlp(), out)
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("x")
    return "sub"


def checkpoint_without_files_list(out):
    save_quantized(mlp(), out)
    path = out / "fxquant.json"
    path.write_text(path.read_text().replace('"files"', '"files_"'))
    return "fxquant.json"


@pytest.mark.parametrize(
    "make", [foreign_text_file, hf_model_directory, checkpoint_plus_a_file, checkpoint_plus_a_directory, checkpoint_without_files_list]
)
def test_non_checkpoint_directory_is_refused_unless_overwrite(tmp_path, make):
    out = tmp_path / "out"
    out.mkdir()
    unlisted = make(out)
    before = contents(out)
    with pytest.raises(ValueError, match=rf"fxquant: {out} is not empty and is not an fxquant checkpoint \(holds .*{unlisted}.*\); "
                                         r"pass overwrite=True"):
        save_quantized(mlp(seed=1), out)
    assert contents(out) == before and hidden_siblings(out) == []
    metadata = save_quantized(mlp(seed=1), out, overwrite=True)
    assert sorted(os.listdir(out)) == sorted(metadata["files"])
    load_quantized(out, mlp())


def test_a_file_or_a_symlink_as_the_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("data")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_quantized(mlp(), tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "data"

    real = tmp_path / "real"
    save_quantized(mlp(), real)
    before = contents(real)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"link is a symbolic link \(to .*real\); .*never writes through a link"):
            save_quantized(mlp(seed=1), tmp_path / "link", overwrite=overwrite)
    assert contents(real) == before and (tmp_path / "link").is_symlink()


def hub_snapshot(tmp_path: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """An HF hub cache layout: snapshots/<rev>/<name> are symlinks into blobs/."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, (name, data) in enumerate(files.items()):
        (blobs / f"blob{i}").write_bytes(data)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / f"blob{i}")
    return blobs, snapshot


@pytest.mark.parametrize("what", ["an fxquant checkpoint", "an HF model, with overwrite"])
def test_symlinked_files_are_replaced_never_written_through(tmp_path, what):
    source = tmp_path / "source"
    if what == "an fxquant checkpoint":
        save_quantized(tiny_llama(), source)
    else:
        tiny_llama().save_pretrained(source)
    blobs, snapshot = hub_snapshot(tmp_path / "hub", contents(source))
    before = contents(blobs)
    assert all((snapshot / name).is_symlink() for name in os.listdir(snapshot))

    metadata = save_quantized(tiny_llama(seed=1), snapshot, QuantConfig(scheme="int8"), overwrite=what != "an fxquant checkpoint")
    assert contents(blobs) == before, "a blob behind a symlink was written"
    assert sorted(os.listdir(snapshot)) == sorted(metadata["files"])
    assert not any((snapshot / name).is_symlink() for name in os.listdir(snapshot))
    load_quantized(snapshot, tiny_llama())


def test_overwrite_unlinks_a_symlinked_subdirectory_without_touching_its_target(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.bin").write_bytes(b"\x00" * 10)
    out = tmp_path / "out"
    save_quantized(mlp(), out)
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    save_quantized(mlp(seed=1), out, overwrite=True)
    assert not (out / "linked").exists() and (elsewhere / "precious.bin").read_bytes() == b"\x00" * 10


# A save that fails leaves the old checkpoint as it was, and no hidden directory.


def fail_writing_json(monkeypatch):
    import fxquant.checkpoint

    monkeypatch.setattr(fxquant.checkpoint, "_write_json", lambda path, content: (_ for _ in ()).throw(OSError("disk full")))


def fail_writing_weights(monkeypatch):
    from fxquant.safetensors_file import FileLayout

    write = FileLayout.write

    def write_half(self, file, name, tensor):
        write(self, file, name, tensor)
        raise OSError("disk full")

    monkeypatch.setattr(FileLayout, "write", write_half)


def fail_syncing(monkeypatch):
    monkeypatch.setattr(checkpoint_dir, "_fsync", lambda path: (_ for _ in ()).throw(OSError("I/O error")))


def fail_exchanging(monkeypatch):
    monkeypatch.setattr(checkpoint_dir, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError("EXDEV")))


def fail_renaming_in_place(monkeypatch):
    """The fallback without an exchange: the old directory is renamed aside, the new one fails to move in."""
    rename = os.rename

    def failing_rename(source, destination):
        if ".fxquant-tmp-" in str(source):
            raise OSError("rename failed")
        rename(source, destination)

    monkeypatch.setattr(checkpoint_dir, "_exchange", lambda a, b: False)
    monkeypatch.setattr(checkpoint_dir.os, "rename", failing_rename)


def interrupted(monkeypatch):
    monkeypatch.setattr(checkpoint_dir, "check_replaceable", _interrupt_on_second_call())


def _interrupt_on_second_call():
    calls = []
    check = checkpoint_dir.check_replaceable

    def check_then_interrupt(*args):
        calls.append(args)
        if len(calls) == 2:  # the check just before the swap
            raise KeyboardInterrupt
        check(*args)

    return check_then_interrupt


@pytest.mark.parametrize(
    "fail", [fail_writing_json, fail_writing_weights, fail_syncing, fail_exchanging, fail_renaming_in_place, interrupted]
)
def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch, fail):
    out = tmp_path / "out"
    save_quantized(tiny_llama(), out)
    before = contents(out)
    fail(monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_quantized(mlp(), out, QuantConfig(scheme="int8"))
    monkeypatch.undo()
    assert_loads_as(out, tiny_llama, before)
    assert hidden_siblings(out) == []


def test_without_an_exchange_the_old_directory_goes_aside_until_the_new_is_in(tmp_path, monkeypatch):
    out = tmp_path / "out"
    save_quantized(tiny_llama(), out)
    seen = []
    rename = os.rename

    def watching_rename(source, destination):
        seen.append((Path(source).name, Path(destination).name))
        rename(source, destination)

    monkeypatch.setattr(checkpoint_dir, "_exchange", lambda a, b: False)
    monkeypatch.setattr(checkpoint_dir.os, "rename", watching_rename)
    metadata = save_quantized(mlp(), out)
    (old_to_aside, new_to_out) = seen
    assert old_to_aside[0] == "out" and old_to_aside[1].startswith(".out.fxquant-old-")
    assert new_to_out[0].startswith(".out.fxquant-tmp-") and new_to_out[1] == "out"
    assert sorted(os.listdir(out)) == sorted(metadata["files"]) and hidden_siblings(out) == []


# A save killed (SIGKILL) at any point: the old checkpoint or the complete new one, never a mix.

SAVE_AND_DIE = """
import os, signal, sys
import torch
from fxquant import checkpoint, checkpoint_dir
from fxquant.checkpoint import save_quantized
from tests.models import MLP

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

point, out = sys.argv[1], sys.argv[2]
if point == "after the weights file":
    checkpoint._write_json = die
elif point == "after the exchange":
    exchange = checkpoint_dir._exchange
    checkpoint_dir._exchange = lambda a, b: exchange(a, b) and die()
torch.manual_seed(1)
model = MLP(dim={dim}, hidden={hidden}, vocab=32).eval()
while True:  # "at random": save until killed from outside
    save_quantized(model, out)
    print("saved", flush=True)
"""


def run_saver(point: str, out: Path, dim: int = 128) -> subprocess.Popen:
    script = SAVE_AND_DIE.format(dim=dim, hidden=2 * dim)
    return subprocess.Popen([sys.executable, "-c", script, point, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("point", ["after the weights file", "after the exchange"])
def test_killed_save_leaves_a_complete_checkpoint(tmp_path, point):
    out = tmp_path / "out"
    save_quantized(mlp(seed=0), out)
    old = contents(out)
    saver = run_saver(point, out)
    assert saver.wait(timeout=120) == -signal.SIGKILL
    if point == "after the weights file":
        assert_loads_as(out, mlp, old)
    else:  # the new checkpoint is in place; the old one is left, hidden, to delete
        new = contents(out)
        assert new != old
        load_quantized(out, mlp())
    (leftover,) = hidden_siblings(out)
    assert leftover.startswith(".out.fxquant-tmp-")
    save_quantized(mlp(seed=2), out)  # its process is gone: the next save deletes it
    assert hidden_siblings(out) == []


def test_save_killed_at_a_random_moment(tmp_path):
    """A process saving a ~13 MB checkpoint over and over, killed at an arbitrary moment: the
    directory holds one complete checkpoint (the old one, or the new one), bit for bit."""
    out = tmp_path / "out"
    save_quantized(mlp(seed=0, dim=1024), out)
    save_quantized(mlp(seed=1, dim=1024), tmp_path / "new")  # what the saver writes, every time
    old, new = contents(out), contents(tmp_path / "new")
    saver = run_saver("random", out, dim=1024)
    assert saver.stdout.readline() == "saved\n"
    time.sleep(torch.rand(()).item() * 0.5)
    saver.send_signal(signal.SIGKILL)
    saver.wait(timeout=60)
    assert contents(out) in (old, new)
    load_quantized(out, mlp(dim=1024))
    assert all(name.startswith(".out.fxquant-") for name in hidden_siblings(out))


def test_only_provably_stale_hidden_directories_are_deleted(tmp_path):
    out = tmp_path / "out"
    save_quantized(mlp(), out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = checkpoint_dir._host()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    names = {
        f".out.fxquant-tmp-{host}-{dead.pid}-0123abcd": False,  # ours, its process gone: deleted
        f".out.fxquant-old-{host}-{dead.pid}-0123abcd": False,  # an old copy, the target in place: deleted
        f".out.fxquant-tmp-{host}-{os.getpid()}-0123abcd": True,  # a live process (a concurrent save)
        f".out.fxquant-tmp-{other_host}-{dead.pid}-0123abcd": True,  # another host's
        ".out.fxquant-tmp-notours": True,
        f".other.fxquant-tmp-{host}-{dead.pid}-0123abcd": True,  # another target's
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    save_quantized(mlp(seed=1), out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(n for n, kept in names.items() if kept)


def test_an_old_copy_is_kept_while_the_target_is_missing(tmp_path):
    """Killed between the fallback's two renames, the old checkpoint lives only in its aside copy."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".out.fxquant-old-{checkpoint_dir._host()}-{dead.pid}-0123abcd"
    save_quantized(mlp(), aside)
    save_quantized(mlp(seed=1), tmp_path / "out")
    assert aside.is_dir()
    load_file(aside / "model.safetensors")
