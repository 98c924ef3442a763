"""`fxquant quantize` never writes over its input (fxquant/cli_paths.py): an output that is the input
(spelled in any way), lies inside it, holds it, or shares a file with it is refused before the
input is read; a non-empty directory that is not a checkpoint is replaced only with --overwrite.

The input is a tiny Llama laid out as an HF hub cache (blobs/ + snapshots/<hash>/ of symlinks into
blobs/); after every run, refused or accepted, each blob's bytes are checked against a digest
taken before."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest

import fxquant.cli
from fxquant.cli import main
from tests.models import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
SNAPSHOT = "snapshots/0123abcd"


def digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved-llama")
    tiny_llama().save_pretrained(path)
    return path


def link_snapshot(cache: Path, snapshot: str) -> Path:
    """snapshots/<hash>/ of relative symlinks to every blob, as huggingface_hub lays a snapshot out."""
    directory = cache / snapshot
    directory.mkdir(parents=True)
    for blob in (cache / "blobs").iterdir():
        (directory / blob.name.removeprefix("blob-")).symlink_to(Path("../..", "blobs", blob.name))
    return directory


@pytest.fixture
def hub_cache(saved_llama, tmp_path, monkeypatch) -> Path:
    """A hub cache of the saved Llama; the working directory is the cache's folder."""
    cache = tmp_path / "models--tiny--llama"
    (cache / "blobs").mkdir(parents=True)
    for path in saved_llama.iterdir():
        shutil.copyfile(path, cache / "blobs" / f"blob-{path.name}")
    link_snapshot(cache, SNAPSHOT)
    monkeypatch.chdir(cache)
    return cache


@pytest.fixture
def reads_nothing(monkeypatch):
    """Fail the test if the command reads the input model (the first read after the path checks)."""
    monkeypatch.setattr(fxquant.cli, "check_not_quantized", lambda directory: pytest.fail(f"{directory} was read"))


def make_other_snapshot(cache: Path) -> str:
    link_snapshot(cache, "snapshots/other")
    return "snapshots/other"


def make_subdirectory(cache: Path) -> str:
    return f"{SNAPSHOT}/out"


def make_hard_links(cache: Path) -> str:
    (cache / "copy").mkdir()
    os.link(cache / "blobs" / "blob-model.safetensors", cache / "copy" / "model.safetensors")
    return "copy"


def make_link_to_one_blob(cache: Path) -> str:
    (cache / "half").mkdir()
    (cache / "half" / "fxquant.json").symlink_to(cache / "blobs" / "blob-config.json")
    return "half"


@pytest.mark.parametrize(
    "make_output, message",
    [
        (lambda cache: SNAPSHOT, "is the input directory"),
        (lambda cache: f"{SNAPSHOT}/", "is the input directory"),
        (lambda cache: f"./{SNAPSHOT}/../0123abcd", "is the input directory"),
        (lambda cache: str(cache / SNAPSHOT), "is the input directory"),  # absolute against relative
        (make_subdirectory, "lies inside the input directory"),
        (lambda cache: ".", "holds the input directory"),
        (lambda cache: "snapshots", "holds the input directory"),
        (lambda cache: "blobs", "holds files of the input"),
        (make_other_snapshot, "holds files of the input"),
        (make_hard_links, "holds files of the input"),
        (make_link_to_one_blob, "holds files of the input"),
    ],
    ids=["same", "trailing-slash", "dot-dot", "absolute", "inside", "cache-root", "parent", "blobs",
         "other-snapshot", "hard-link", "link-to-one-blob"],
)
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["", "overwrite"])
def test_an_output_that_would_touch_the_input_is_refused_before_reading_it(
    hub_cache, reads_nothing, capsys, make_output, message, overwrite
):
    output = make_output(hub_cache)
    blobs = digests(hub_cache / "blobs")
    listing = sorted(str(path.relative_to(hub_cache)) for path in hub_cache.rglob("*"))
    assert main(["quantize", SNAPSHOT, output, *overwrite]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"fxquant quantize: error: {Path(output)} {message}") and error.count("\n") == 1, error
    assert digests(hub_cache / "blobs") == blobs, "a blob changed"
    assert sorted(str(path.relative_to(hub_cache)) for path in hub_cache.rglob("*")) == listing, "a file appeared or went"


def test_quantizing_a_snapshot_into_a_new_directory_leaves_the_blobs_as_they_were(hub_cache, capsys):
    blobs = digests(hub_cache / "blobs")
    for _ in range(2):  # the second run replaces the first run's checkpoint, no --overwrite needed
        assert main(["quantize", SNAPSHOT, "out"]) == 0, capsys.readouterr().err
        assert "out: LlamaForCausalLM, fp8_rowwise, 14 of 15 linear layers quantized" in capsys.readouterr().out
        assert digests(hub_cache / "blobs") == blobs, "a blob changed"
        written = sorted((hub_cache / "out").iterdir())
        assert [path.name for path in written] == ["config.json", "fxquant.json", "generation_config.json", "model.safetensors"]
        assert not any(path.is_symlink() for path in written)


def test_a_non_empty_directory_that_is_no_checkpoint_is_replaced_only_with_overwrite(saved_llama, tmp_path, capsys):
    output = tmp_path / "notes"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert main(["quantize", str(saved_llama), str(output)]) == 1
    assert "is not empty and is not an fxquant checkpoint (holds notes.txt)" in capsys.readouterr().err
    assert (output / "notes.txt").read_text() == "mine"

    assert main(["quantize", str(saved_llama), str(output), "--overwrite"]) == 0, capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == ["config.json", "fxquant.json", "generation_config.json", "model.safetensors"]


def test_an_output_that_is_a_symlink_is_refused_and_its_target_kept(saved_llama, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(target)
    for overwrite in ([], ["--overwrite"]):
        assert main(["quantize", str(saved_llama), str(tmp_path / "link"), *overwrite]) == 1
        assert "is a symbolic link" in capsys.readouterr().err
        assert [path.name for path in target.iterdir()] == ["keep.txt"]


def test_an_output_that_is_a_file_is_refused(saved_llama, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["quantize", str(saved_llama), str(tmp_path / "file"), "--overwrite"]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_an_interrupted_run_says_so_and_leaves_no_output(saved_llama, tmp_path, monkeypatch, capsys):
    from fxquant import checkpoint_dir

    check, calls = checkpoint_dir.check_replaceable, []

    def interrupt_before_the_swap(*args):  # Ctrl-C once the weights are written, before the rename
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        check(*args)

    monkeypatch.setattr(checkpoint_dir, "check_replaceable", interrupt_before_the_swap)
    assert main(["quantize", str(saved_llama), str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().endswith("fxquant quantize: interrupted")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory
