"""The command line's errors and options (fxquant/cli.py): bad input is one line with one prefix
naming the file; a closed pipe is quiet; --skip works before and after the positionals; --hf-format
auto picks the layout of each scheme and says what it wrote; bad inputs (a missing directory, a
file for a directory, an already-quantized directory, a malformed fxquant.json) are named."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fxquant.cli import main
from tests.test_cli import llama_dir  # noqa: F401  (the tiny Llama's directory, a fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints") / "fp8"
    assert main(["quantize", str(llama_dir), str(out)]) == 0
    return out


def one_error(capsys, command: str) -> str:
    """The message of the one error line the command printed, checked for a single prefix."""
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"fxquant {command}: error: "), err
    message = lines[0].removeprefix(f"fxquant {command}: error: ")
    assert not message.startswith("fxquant"), f"doubled prefix: {lines[0]}"
    return message


@pytest.mark.parametrize("command", ["plan", "quantize"])
def test_a_missing_directory_or_a_file_is_named(command, llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = ["out"] if command == "quantize" else []
    assert main([command, "no-such-dir", *out]) == 1
    assert one_error(capsys, command) == "no-such-dir: no such directory"
    assert main([command, str(llama_dir / "model.safetensors"), *out]) == 1
    assert one_error(capsys, command) == f"{llama_dir / 'model.safetensors'}: is a file, not a model directory"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "mark",
    [
        lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "fp8"}})),
        lambda d: (d / "fxquant.json").write_text("{}"),
    ],
    ids=["quantization_config", "fxquant.json"],
)
def test_an_already_quantized_directory_is_refused(mark, llama_dir, tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    for path in llama_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    mark(source)
    assert main(["quantize", str(source), str(tmp_path / "out")]) == 1
    assert "is already quantized" in one_error(capsys, "quantize")


def test_a_checkpoint_written_by_fxquant_is_refused_as_input(checkpoint, tmp_path, capsys):
    assert main(["quantize", str(checkpoint), str(tmp_path / "again")]) == 1
    assert one_error(capsys, "quantize") == f"{checkpoint} is already quantized (fbgemm_fp8); quantize the float model it came from"


@pytest.mark.parametrize(
    "arguments",
    [
        ["--skip", "lm_head", "--skip", "*.down_proj", "DIR"],
        ["DIR", "--skip", "lm_head", "--skip", "*.down_proj"],
        ["--skip", "lm_head,*.down_proj", "DIR"],
        ["DIR", "--skip", "*.down_proj,lm_head"],
    ],
    ids=["before", "after", "comma-before", "comma-after"],
)
def test_skip_works_before_and_after_the_directory(arguments, llama_dir, capsys):
    assert main(["plan", *[str(llama_dir) if a == "DIR" else a for a in arguments]]) == 0
    table = capsys.readouterr().out
    assert table.count("skipped by skip list") == 3 and table.rstrip().endswith("12 of 15 linear layers quantized")


def test_an_empty_skip_quantizes_every_layer_and_no_skip_keeps_the_default(llama_dir, capsys):
    assert main(["plan", str(llama_dir), "--skip", ""]) == 0
    assert capsys.readouterr().out.rstrip().endswith("15 of 15 linear layers quantized")
    assert main(["plan", str(llama_dir)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("14 of 15 linear layers quantized")


def test_skip_before_the_positionals_of_quantize(llama_dir, tmp_path, capsys):
    assert main(["quantize", "--skip", "lm_head", "--skip", "*.q_proj", str(llama_dir), str(tmp_path / "out")]) == 0
    assert "12 of 15 linear layers quantized" in capsys.readouterr().out  # lm_head and two q_proj


@pytest.mark.parametrize(
    "scheme, written",
    [("fp8_rowwise", "fbgemm_fp8"), ("fp8_blockwise", "compressed-tensors"), ("int8", "compressed-tensors"), ("fp8_tensorwise", None)],
)
def test_hf_format_auto_writes_the_layout_of_each_scheme_and_says_so(scheme, written, llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    if scheme == "fp8_blockwise":  # 128-wide blocks: a Llama whose layers are whole blocks
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=128)
        llama_dir = tmp_path / "llama-128"
        LlamaForCausalLM(config).save_pretrained(llama_dir)
    assert main(["quantize", str(llama_dir), str(out), "--scheme", scheme]) == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    if written is None:
        assert not (out / "config.json").exists()
        why = "fbgemm_fp8 describes fp8_rowwise only, not fp8_tensorwise; compressed-tensors has no dynamic fp8_tensorwise layout"
        assert f"config.json: none written: {why}; transformers cannot load {out}" in report
    else:
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == written
        assert f"config.json: quantization_config {written}, for transformers and vLLM" in report


@pytest.mark.parametrize("scheme, layout, why", [
    ("int8", "fbgemm_fp8", "fbgemm_fp8 describes fp8_rowwise only, not int8"),
    ("fp8_blockwise", "fbgemm_fp8", "fbgemm_fp8 describes fp8_rowwise only, not fp8_blockwise"),
    ("fp8_tensorwise", "compressed-tensors", "compressed-tensors has no dynamic fp8_tensorwise layout"),
])
def test_a_layout_that_cannot_describe_the_scheme_is_refused_before_reading(scheme, layout, why, llama_dir, tmp_path, capsys):
    assert main(["quantize", str(llama_dir), str(tmp_path / "out"), "--scheme", scheme, "--hf-format", layout]) == 1
    assert one_error(capsys, "quantize") == f"--hf-format {layout}: {why}; use --hf-format auto"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("plan"), "plan"),
        (lambda m: m.update(config=[]), "config"),
        (lambda m: m["plan"][0].update(shape=[1, 2, 3]), "plan"),
        (lambda m: m.update(tied=["a"]), "tied"),
    ],
    ids=["missing-plan", "list-for-config", "three-dim-shape", "list-for-tied"],
)
def test_inspect_names_a_malformed_fxquant_json(edit, message, checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in checkpoint.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    metadata = json.loads((broken / "fxquant.json").read_text())
    edit(metadata)
    (broken / "fxquant.json").write_text(json.dumps(metadata))
    assert main(["inspect", str(broken)]) == 1
    error = one_error(capsys, "inspect")
    assert error.startswith(f"{broken / 'fxquant.json'}") and message in error, error


def test_inspect_notes_where_a_reader_computes_otherwise(checkpoint, tmp_path, capsys):
    assert main(["inspect", str(checkpoint)]) == 0
    assert "note:" not in capsys.readouterr().out, "fxquant's own checkpoint agrees with its config.json"
    old = tmp_path / "old"
    old.mkdir()
    for path in checkpoint.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    metadata = json.loads((old / "fxquant.json").read_text())
    metadata["quantization_config"]["activation_scale_ub"] = 1200.0  # what fxquant wrote before, with no bound
    (old / "fxquant.json").write_text(json.dumps(metadata))
    assert main(["inspect", str(old)]) == 0
    assert ("note: config.json's activation_scale_ub is 1200.0: transformers clamps activation amax there, "
            "fxquant computed with no bound") in capsys.readouterr().out


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    """`fxquant inspect X | head -1` with more output than a pipe holds: no BrokenPipeError printed."""
    save_file({f"layers.{i}.a_long_module_name.weight": torch.zeros(1) for i in range(3000)}, tmp_path / "w.safetensors")
    command = [sys.executable, "-m", "fxquant.cli", "inspect", str(tmp_path / "w.safetensors")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("tensor")
    process.stdout.close()
    error = process.stderr.read()
    process.wait(timeout=120)
    assert error == "" and process.returncode == 1, error


def test_a_scheme_that_quantizes_no_layer_is_refused_before_anything_is_written(llama_dir, tmp_path, capsys):
    """fp8_blockwise's 128-wide blocks fit none of the tiny Llama's 64-wide layers: the checkpoint would be
    the input under a quantization config, so nothing is written and the reasons are given."""
    out = tmp_path / "blockwise"
    assert main(["quantize", str(llama_dir), str(out), "--scheme", "fp8_blockwise"]) == 1
    message = one_error(capsys, "quantize")
    assert message.startswith(f"{llama_dir}: fp8_blockwise quantizes none of its 15 layers (")
    assert "not a multiple of the 128-wide weight block" in message and "nothing written" in message
    assert not out.exists()
