"""Checkpoints in llm-compressor's compressed-tensors layout (the one vLLM loads), read back by
compressed-tensors and transformers themselves, not by fxquant's reader."""

import json

import pytest
import torch

import fxquant
from fxquant import QuantConfig
from tests.graphs import rewrite
from tests.models import relative_error, tiny_llama

compressed_tensors = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "fp8_rowwise": QuantConfig(scheme="fp8_rowwise"),
    "fp8_blockwise": QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32)),
    "int8": QuantConfig(scheme="int8"),
}


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_transformers_loads_the_checkpoint_with_compressed_tensors(tmp_path, scheme):
    config = CONFIGS[scheme]
    model = tiny_llama()
    fxquant.save_quantized(model, tmp_path, config, hf_format="compressed-tensors")

    quantization_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = compressed_tensors.QuantizationConfig.model_validate(quantization_config)
    assert parsed.ignore == ["lm_head"]
    assert parsed.config_groups["group_0"].input_activations.dynamic is True

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 12))
    _, ours, _ = rewrite(model, ids, config=config, use_cache=False)
    with torch.no_grad():
        theirs = loaded(ids, use_cache=False).logits
        original = model(ids, use_cache=False).logits
    # transformers runs the stored weights with compressed-tensors' own dynamic activation
    # quantization; fxquant computes the same W8A8 product. Measured: 2e-7 for both FP8 schemes.
    # For int8 compressed-tensors' reference scales activations by amax / 127.5 (the full
    # [-128, 127] range), fxquant (like vLLM's int8 kernels) by amax / 127: measured 7.8e-3.
    error = relative_error(theirs, ours.logits)
    print(f"\n{scheme}: compressed-tensors vs fxquant logits relative error {error:.2e}")
    assert error < (2e-2 if scheme == "int8" else 1e-5), "compressed-tensors and fxquant disagree on the checkpoint"
    assert 0 < relative_error(theirs, original) < 0.08


@pytest.mark.parametrize("rules, bound", [({"*.gate_proj": "fp8_blockwise"}, 1e-5), ({"*.gate_proj": "fp8_blockwise", "*.down_proj": "int8"}, 2e-2)])
def test_a_checkpoint_of_mixed_schemes_has_a_group_per_scheme(tmp_path, rules, bound):
    """Per-layer rules: one group per scheme, targeting its layers by name (a "mixed-precision" format
    where their formats differ); transformers loads each layer in its own scheme and computes what
    fxquant does (int8's activation rounding as above)."""
    config = QuantConfig(scheme="fp8_rowwise", rules=rules, weight_block_size=(32, 32))
    model = tiny_llama()
    metadata = fxquant.save_quantized(model, tmp_path, config)  # "auto" picks compressed-tensors
    groups = metadata["quantization_config"]["config_groups"]
    assert metadata["quantization_config"]["format"] == ("float-quantized" if len(rules) == 1 else "mixed-precision")
    assert groups["group_1"]["targets"] == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    assert [group["format"] for group in groups.values()] == ["float-quantized"] * 2 + ["int-quantized"] * (len(rules) - 1)
    compressed_tensors.QuantizationConfig.model_validate(metadata["quantization_config"])

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    mlp = loaded.model.layers[1].mlp
    assert (mlp.gate_proj.weight_scale.shape, mlp.up_proj.weight_scale.shape) == ((4, 2), (128, 1))
    ids = torch.randint(0, 128, (2, 12))
    _, ours, _ = rewrite(model, ids, config=config, use_cache=False)
    with torch.no_grad():
        theirs = loaded(ids, use_cache=False).logits
    assert relative_error(theirs, ours.logits) < bound


def test_unknown_hf_format_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown hf_format 'vllm'; known: auto, fbgemm_fp8, compressed-tensors, None"):
        fxquant.save_quantized(tiny_llama(), tmp_path, hf_format="vllm")
