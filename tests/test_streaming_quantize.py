"""`fxquant quantize` streams (fxquant/streaming_quantize.py): the same bytes as loading the model
and `save_quantized`, in any dtype, tied or not, with any number of workers; the input's other files
copied; peak memory a few tensors, not the model; a killed run leaves no output."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fxquant import QuantConfig, save_quantized
from fxquant.checkpoint_writer import Piece, write_weights
from fxquant.cli import main
from fxquant.footprint import nbytes
from fxquant.hf_model import load_model, model_class, read_config
from tests.models import tiny_llama, tiny_llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def saved_llama(path, dtype=torch.float32, tied=False, shard="100KB"):
    config = tiny_llama_config()
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path, max_shard_size=shard)
    return path


def weights(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if "safetensors" in path.name}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8"])
def test_the_stream_writes_what_save_quantized_of_the_loaded_model_writes(tmp_path, dtype, tied, scheme, capsys):
    source = saved_llama(tmp_path / "in", dtype, tied)
    assert len([p for p in source.iterdir() if p.suffix == ".safetensors"]) > 1
    streamed = tmp_path / "streamed"
    assert main(["quantize", str(source), str(streamed), "--scheme", scheme, "--max-shard-size", "60KB", "--workers", "3"]) == 0
    assert "loaded whole" not in capsys.readouterr().out
    config = read_config(source)
    model = load_model(source, model_class(config)[0], config)
    reference = json.loads(json.dumps(save_quantized(model, tmp_path / "loaded", QuantConfig(scheme=scheme), max_shard_size="60KB")))
    assert weights(streamed) == weights(tmp_path / "loaded")  # bit for bit, index included
    metadata = json.loads((streamed / "fxquant.json").read_text())
    assert {k: v for k, v in metadata.items() if k != "files"} == {k: v for k, v in reference.items() if k != "files"}
    assert json.loads((streamed / "config.json").read_text()) == json.loads((tmp_path / "loaded" / "config.json").read_text())
    assert metadata["tensors"]["model.norm.weight"]["dtype"] == str(dtype).removeprefix("torch.")  # kept as the input holds it
    assert ("lm_head.weight" in metadata["tied"]) == tied


def test_the_inputs_other_files_are_copied_and_its_weights_are_not(tmp_path, capsys):
    source = saved_llama(tmp_path / "in")
    (source / "tokenizer.json").write_text("{}")
    (source / "README.md").write_text("# a model")
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text("{}")
    (source / "original").mkdir()
    (source / "original" / "consolidated.00.pth").write_bytes(b"float weights")
    (source / "pytorch_model.bin").write_bytes(b"another copy")
    assert main(["quantize", str(source), str(tmp_path / "out"), "--max-shard-size", "1GB"]) == 0, capsys.readouterr().err
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == ["1_Pooling", "README.md", "config.json", "fxquant.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(json.loads((tmp_path / "out" / "fxquant.json").read_text())["files"]) == written


def test_pickle_weights_are_loaded_whole_and_the_note_says_so(tmp_path, capsys):
    source = tmp_path / "in"
    model = tiny_llama()
    model.save_pretrained(source)
    (source / "model.safetensors").unlink()  # transformers 5 writes safetensors only
    torch.save({n: t for n, t in model.state_dict().items() if n != "lm_head.weight" or not model.config.tie_word_embeddings},
               source / "pytorch_model.bin")
    assert main(["quantize", str(source), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert "is loaded whole, not streamed: " in capsys.readouterr().out


def test_the_progress_bar_counts_bytes_on_a_terminal(tmp_path, capsys, monkeypatch):
    source = saved_llama(tmp_path / "in")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["quantize", str(source), str(tmp_path / "out")]) == 0
    assert "quantizing: 100%" in capsys.readouterr().err
    assert main(["quantize", str(source), str(tmp_path / "out"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# A Llama of ~1.1 GB in bf16 (hidden 1024, intermediate 4096, 28 layers, vocab 32000), in 9 shards.
BIG = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=8, num_key_value_heads=8,
           vocab_size=32000, tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """Random bf16 weights written tensor by tensor, as a save_pretrained directory; (path, bytes, largest tensor)."""
    from fxquant import empty_weights

    path = tmp_path_factory.mktemp("big")
    config = transformers.LlamaConfig(**BIG)
    with empty_weights():
        shapes = {name: tuple(t.shape) for name, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    pieces = [Piece({name: (torch.bfloat16, shape)}, lambda name=name, shape=shape: {name: torch.randn(shape, dtype=torch.bfloat16)})
              for name, shape in shapes.items()]
    write_weights(path, pieces, "128MB")
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    sizes = [nbytes(torch.bfloat16, shape) for shape in shapes.values()]
    return path, sum(sizes), max(sizes)


PEAK_RSS = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
assert result.returncode == 0, result.stderr
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""

# What a process holds that has only imported fxquant's command line and transformers, built the
# model on the meta device and read the largest tensors: the floor under the quantizer's peak.
FLOOR = """
import sys, torch, transformers, fxquant.cli, fxquant.streaming_quantize as s
from pathlib import Path
path = Path(sys.argv[1])
config = transformers.AutoConfig.from_pretrained(path)
with fxquant.empty_weights():
    transformers.LlamaForCausalLM(config)
files = s.input_files(path)
largest = sorted(files, key=lambda n: -s.read_header(path / files[n])[n][1][0] * s.read_header(path / files[n])[n][1][-1])[:int(sys.argv[2])]
held = [s.read_tensor(path / files[n], n).float() for n in largest]
"""


def peak_rss(*command) -> int:
    """The peak RSS in bytes of `command`, the only child of a fresh process (RUSAGE_CHILDREN is the largest child's)."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, command)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_peak_memory_is_a_few_tensors_not_the_model(big_checkpoint, tmp_path):
    path, size, largest = big_checkpoint
    assert size > 10**9 and len(list(path.glob("*.safetensors"))) >= 8
    quantizer = peak_rss(sys.executable, "-m", "fxquant.cli", "quantize", path, tmp_path / "out", "--workers", "2", "--max-shard-size", "200MB")
    floor = peak_rss(sys.executable, "-c", FLOOR, path, 4)  # four largest tensors, in float32
    imports = peak_rss(sys.executable, "-c", FLOOR, path, 0)
    print(f"\npeak RSS: quantizer {quantizer / 2**20:.0f} MiB, floor {floor / 2**20:.0f} MiB, imports alone "
          f"{imports / 2**20:.0f} MiB, checkpoint {size / 2**20:.0f} MiB")
    assert quantizer < floor, "the quantizer held more than a few tensors"
    assert quantizer - imports < size / 3, "the quantizer's tensors are a good part of the model"
    assert len(json.loads((tmp_path / "out" / "fxquant.json").read_text())["sha256"]) >= 3


def test_a_killed_run_leaves_no_output(big_checkpoint, tmp_path):
    path, _, _ = big_checkpoint
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "fxquant.cli", "quantize", str(path), str(out)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not any(".fxquant-tmp-" in p.name and any(p.iterdir()) for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists(), "a killed run left an output directory"
    assert main(["quantize", str(path), str(out), "--quiet"]) == 0  # the next run replaces its staging
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
