"""bitsandbytes' 4-bit checkpoint layout (fxquant/bnb_checkpoints.py) both ways, on a tiny Llama:
fxquant writes it and transformers loads it with bitsandbytes (on the CPU), and what transformers
quantized with BitsAndBytesConfig(load_in_4bit=True) on the CPU runs in fxquant as stored nf4 / fp4
with the same bytes and outputs. transformers' bitsandbytes loading needs accelerate; those tests
skip without it, the others compare with bitsandbytes' QuantState directly."""

import json

import pytest
import torch

import fxquant
from fxquant import QuantConfig, empty_weights, load_bitsandbytes, save_bitsandbytes
from fxquant.bnb_checkpoints import QUANT_STATE
from tests.models import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[1, 5, 9, 2, 77, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def reference_path(model):
    """bitsandbytes' Linear4bit on the dequantize-then-matmul path in its compute dtype: on a CPU with
    AVX512-BF16 it otherwise repacks the weight for a kernel that computes in bfloat16 whatever the
    compute dtype (bitsandbytes/backends/cpu/ops.py), which is not the arithmetic under test."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def fxquant_4bit(model, config):
    """The model with fxquant's own layers: a copy quantized in place."""
    import copy

    quantized = copy.deepcopy(model)
    fxquant.quantize_(quantized, config)
    return quantized


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_written_layout_is_bitsandbytes_quant_state(tmp_path, quant_type):
    model = tiny_llama()
    quantization_config = save_bitsandbytes(model, tmp_path / "out", QuantConfig(scheme=quant_type))
    assert quantization_config["bnb_4bit_quant_type"] == quant_type and quantization_config["load_in_4bit"]
    assert quantization_config["llm_int8_skip_modules"] == ["lm_head"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == quantization_config

    from safetensors.torch import load_file

    stored = load_file(tmp_path / "out" / "model.safetensors")
    layer = "model.layers.1.mlp.down_proj"
    state = {key.removeprefix(f"{layer}.weight."): t for key, t in stored.items() if key.startswith(f"{layer}.weight.")}
    quant_state = bnb.functional.QuantState.from_dict(state, device="cpu")
    weight = model.get_submodule(layer).weight.detach()
    packed, expected = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type=quant_type)
    assert torch.equal(stored[f"{layer}.weight"], packed)
    assert quant_state == expected  # bitsandbytes' own comparison: absmax, code, nested state, offset, shape
    assert torch.equal(bnb.functional.dequantize_4bit(packed, quant_state), bnb.functional.dequantize_4bit(packed, expected))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_transformers_loads_what_fxquant_wrote(tmp_path, quant_type):
    pytest.importorskip("accelerate")
    model = tiny_llama()
    config = QuantConfig(scheme=quant_type)
    save_bitsandbytes(model, tmp_path / "out", config)
    loaded = reference_path(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval())
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # the same dequantized float32 weights; only the GEMMs' summation order differs
    torch.testing.assert_close(logits(loaded), logits(fxquant_4bit(model, config)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fxquant_runs_what_transformers_quantized(tmp_path, quant_type):
    pytest.importorskip("accelerate")
    model = tiny_llama()
    model.save_pretrained(tmp_path / "float")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=bnb_config).eval()
    reference_path(theirs)
    theirs.save_pretrained(tmp_path / "bnb")

    with empty_weights():
        ours = transformers.LlamaForCausalLM(model.config)
    load_bitsandbytes(tmp_path / "bnb", ours)
    up = ours.model.layers[0].mlp.up_proj
    assert up.weight.dtype == torch.uint8 and up.weight.shape == (128, 32) and "stored " + quant_type in repr(up)
    # bitsandbytes quantized the same float32 weights on the CPU: fxquant's own quantization, to the bit
    expected = fxquant.SCHEMES[quant_type].quantize(model.model.layers[0].mlp.up_proj.weight.detach(),
                                                    fxquant.SCHEMES[quant_type].options({}))
    assert torch.equal(up.weight, expected["weight"]) and torch.equal(up.weight_absmax, expected["weight_absmax"])
    assert torch.equal(up.weight_offset, expected["weight_offset"])
    expected_logits = logits(theirs)
    torch.testing.assert_close(logits(ours), expected_logits, rtol=1e-4, atol=1e-4)
    if quant_type == "nf4":  # and compiled (one Inductor compile is enough)
        torch.testing.assert_close(logits(torch.compile(ours, backend="fxquant")), expected_logits, rtol=1e-4, atol=1e-4)


def test_refusals_name_the_reason(tmp_path):
    model = tiny_llama()
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        save_bitsandbytes(model, tmp_path / "exists")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj in bitsandbytes' layout: scheme int8"):
        save_bitsandbytes(model, tmp_path / "int8", QuantConfig(scheme="int8"))
    assert not (tmp_path / "int8").exists()
    with pytest.raises(ValueError, match="options .* differ"):
        save_bitsandbytes(model, tmp_path / "mixed", QuantConfig(scheme="nf4", rules={"*.mlp.*": "fp4"}))

    save_bitsandbytes(model, tmp_path / "out")
    from safetensors.torch import load_file, save_file

    stored = load_file(tmp_path / "out" / "model.safetensors")
    del stored["model.layers.0.mlp.up_proj.weight.nested_absmax"]
    save_file(stored, tmp_path / "out" / "model.safetensors")
    with empty_weights():
        target = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj: .* no double quantization"):
        load_bitsandbytes(tmp_path / "out", target)


def test_stored_layers_are_written_as_they_are(tmp_path):
    """fxquant's own nf4 checkpoint, loaded, converts to bitsandbytes' layout with the same bytes;
    and bitsandbytes' layout read and written again is the same tensors."""
    from safetensors.torch import load_file

    model = tiny_llama()
    config = QuantConfig(scheme="nf4")
    save_bitsandbytes(model, tmp_path / "direct", config)
    fxquant.save_quantized(model, tmp_path / "fxquant", config)
    with empty_weights():
        loaded = transformers.LlamaForCausalLM(model.config)
    fxquant.load_quantized(tmp_path / "fxquant", loaded)
    save_bitsandbytes(loaded, tmp_path / "converted", config)
    with empty_weights():
        again = transformers.LlamaForCausalLM(model.config)
    load_bitsandbytes(tmp_path / "direct", again)  # runs with the compute dtype the checkpoint names
    save_bitsandbytes(again, tmp_path / "again", QuantConfig(scheme="nf4", scheme_options={"nf4": {"compute_dtype": "float32"}}))
    direct = load_file(tmp_path / "direct" / "model.safetensors")
    for other in ("converted", "again"):
        written = load_file(tmp_path / other / "model.safetensors")
        assert written.keys() == direct.keys(), other
        assert all(torch.equal(written[name], direct[name]) for name in direct), other


def test_command_line_writes_the_bitsandbytes_layout(tmp_path, capsys):
    """`fxquant quantize --scheme nf4 --hf-format bitsandbytes`: save_bitsandbytes' checkpoint, the
    input's other files copied; refused, before anything is written, for another scheme or an existing
    output."""
    from fxquant.cli import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "in")
    (tmp_path / "in" / "tokenizer.json").write_text("{}")
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--scheme", "nf4", "--hf-format", "bitsandbytes"]) == 0
    save_bitsandbytes(model, tmp_path / "api", QuantConfig(scheme="nf4"))
    config, api_config = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("out", "api"))
    assert config["quantization_config"] == api_config["quantization_config"]
    from safetensors.torch import load_file

    written, expected = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "api" / "model.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[name], expected[name]) for name in expected)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"

    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "int8"), "--scheme", "int8", "--hf-format", "bitsandbytes"]) == 1
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--scheme", "nf4", "--hf-format", "bitsandbytes"]) == 1
    assert not (tmp_path / "int8").exists() and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "config.json: quantization_config bitsandbytes (nf4): 14 4-bit layers" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "own"), "--scheme", "nf4"]) == 0  # fxquant's layout
    assert "(--hf-format bitsandbytes writes a layout it loads)" in capsys.readouterr().out


def test_a_truncated_weights_file_is_refused_by_name(tmp_path):
    save_bitsandbytes(tiny_llama(), tmp_path / "out", QuantConfig(scheme="nf4"))
    weights = tmp_path / "out" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
        load_bitsandbytes(tmp_path / "out", tiny_llama())


def test_layers_transformers_keeps_in_float32_stay_float(tmp_path):
    """T5's `wo` (T5PreTrainedModel._keep_in_fp32_modules): transformers never makes it a bitsandbytes
    layer, so a 4-bit `wo` would not load; written float and listed in llm_int8_skip_modules, the
    checkpoint loads in transformers and gives what fxquant's own layers give."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    written = save_bitsandbytes(model, tmp_path / "out", QuantConfig(scheme="nf4"))
    wo = ["encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.0.layer.2.DenseReluDense.wo"]
    assert set(wo) <= set(written["llm_int8_skip_modules"])
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert all(stored[f"{name}.weight"].dtype == torch.float32 and f"{name}.{QUANT_STATE}nf4" not in stored for name in wo)
    assert f"encoder.block.0.layer.1.DenseReluDense.wi.{QUANT_STATE}nf4" in stored
    pytest.importorskip("accelerate")
    loaded = reference_path(transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval())
    ours = load_bitsandbytes(tmp_path / "out", transformers.T5ForConditionalGeneration(config).eval())
    ids, start = torch.tensor([[3, 9, 14, 2]]), torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, decoder_input_ids=start).logits,
                                   ours(input_ids=ids, decoder_input_ids=start).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_layers_are_written_as_transformers_linear4bit(tmp_path):
    """GPT-2's Conv1D ([K, N] weights): written as the Linear4bit transformers makes of a Conv1D (the
    weight quantized as [N, K]); transformers loads it, and fxquant loads it back as stored Conv1D layers
    with the same outputs as fxquant's own nf4 layers."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    save_bitsandbytes(model, tmp_path / "out", QuantConfig(scheme="nf4"))
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "out" / "model.safetensors")
    state = json.loads(bytes(stored[f"transformer.h.0.attn.c_attn.{QUANT_STATE}nf4"].tolist()))
    assert state["shape"] == [192, 64]  # c_attn: [K=64, N=192] in GPT-2, [N, K] as a Linear4bit
    ours = load_bitsandbytes(tmp_path / "out", transformers.GPT2LMHeadModel(config).eval())
    expected = logits(fxquant_4bit(model, QuantConfig(scheme="nf4")))
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-4)
    pytest.importorskip("accelerate")
    loaded = reference_path(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval())
    assert type(loaded.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-4, atol=1e-4)


KILLED_SAVE = """
import os, signal, sys
import fxquant.bnb_checkpoints as bnb_checkpoints
from tests.models import tiny_llama

def killed(tensors, path, metadata=None):  # the weights half written, then the process dies
    open(path, "wb").write(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)

bnb_checkpoints.save_file = killed
bnb_checkpoints.save_bitsandbytes(tiny_llama(), sys.argv[1])
"""


def test_a_save_killed_midway_leaves_nothing_the_next_save_keeps(tmp_path):
    """A save killed while writing leaves no output, only its hidden staging directory, which the next
    save into the same place deletes (its process is gone); that save's output is whole."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(out)], cwd=Path(__file__).parent.parent)
    assert killed.returncode == -9
    left = [path.name for path in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.fxquant-tmp-") and not out.exists()
    model = tiny_llama()
    save_bitsandbytes(model, out)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    with empty_weights():
        target = transformers.LlamaForCausalLM(model.config)
    torch.testing.assert_close(logits(load_bitsandbytes(out, target)), logits(fxquant_4bit(model, QuantConfig(scheme="nf4"))),
                               rtol=1e-4, atol=1e-4)
