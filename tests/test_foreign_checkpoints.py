"""FP8 checkpoints others made, loaded without an fxquant.json (fxquant/foreign_checkpoints.py):
HF transformers' fbgemm_fp8 and llm-compressor's compressed-tensors layouts written by hand (with an
independent quantizer) or by fxquant for transformers, and what fxquant cannot run exactly refused
with the layer and the field, the model untouched."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fxquant import QuantConfig, empty_weights, load_quantized, save_quantized
from fxquant.passes.stored_weights import STORED_WEIGHTS
from tests.models import relative_error, tiny_llama, tiny_llama_config

transformers = pytest.importorskip("transformers")
compressed_tensors = pytest.importorskip("compressed_tensors")

E4M3_MAX = 448.0


def by_hand(w: torch.Tensor, per: str, scale_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight and its scale, per output channel ([N, 1]) or per tensor ([1]), computed here."""
    amax = w.abs().amax(dim=1, keepdim=True) if per == "channel" else w.abs().amax().reshape(1)
    scale = (amax / E4M3_MAX).to(scale_dtype)
    return (w / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def write_checkpoint(directory, per, quantization_config, scale_dtype=torch.float32, skip=("lm_head",)):
    """A tiny Llama's checkpoint quantized by hand; the float model with the dequantized weights."""
    model = tiny_llama()
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in skip:
            w_q, scale = by_hand(module.weight.detach(), per, scale_dtype)
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = w_q, scale
            module.weight.data = w_q.float() * scale.float()
    directory.mkdir()
    save_file({n: t.contiguous() for n, t in state.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**model.config.to_dict(), "quantization_config": quantization_config}))
    return model, state


def empty_llama():
    with empty_weights():
        return transformers.LlamaForCausalLM(tiny_llama_config())


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("not_converted", [["lm_head"], None], ids=["listed", "default"])
def test_an_fbgemm_fp8_checkpoint_loads_as_fp8_rowwise(tmp_path, not_converted):
    layout = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": not_converted}
    reference, state = write_checkpoint(tmp_path / "ckpt", "channel", layout)
    model = load_quantized(tmp_path / "ckpt", empty_llama())
    q_proj = model.model.layers[1].self_attn.q_proj
    assert torch.equal(q_proj.weight.view(torch.uint8), state["model.layers.1.self_attn.q_proj.weight"].view(torch.uint8))
    assert torch.equal(q_proj.weight_scale, state["model.layers.1.self_attn.q_proj.weight_scale"])
    stored = STORED_WEIGHTS.get(q_proj.weight)
    assert (stored.scheme, stored.options.activation_scale_ub) == ("fp8_rowwise", 1200.0)
    assert model.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, 128, (2, 12))
    error = relative_error(logits(model, ids), logits(reference, ids))  # activations quantized per token: ~1e-2
    assert error < 0.05


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32)),
                                    QuantConfig(scheme="int8"), QuantConfig(rules={"*.gate_proj": "fp8_blockwise"}, weight_block_size=(32, 32))],
                         ids=["fp8_rowwise", "fp8_blockwise", "int8", "mixed"])
def test_a_compressed_tensors_checkpoint_loads_without_fxquant_json_as_with_it(tmp_path, config):
    """The tensors fxquant writes for transformers (tests/test_compressed_tensors.py: transformers reads
    them so), read back through config.json alone: the same layers, schemes, options and logits."""
    save_quantized(tiny_llama(), tmp_path / "ckpt", config, hf_format="compressed-tensors", max_shard_size="40KB")
    ids = torch.randint(0, 128, (2, 12))
    ours = logits(load_quantized(tmp_path / "ckpt", empty_llama()), ids)
    (tmp_path / "ckpt" / "fxquant.json").unlink()
    model = load_quantized(tmp_path / "ckpt", empty_llama())
    assert torch.equal(logits(model, ids), ours)
    assert STORED_WEIGHTS.get(model.model.layers[0].mlp.gate_proj.weight).scheme == config.decide("model.layers.0.mlp.gate_proj").scheme


def group(weights, activations, targets=("Linear",)):
    return {"targets": list(targets), "weights": weights, "input_activations": activations}


def args(kind="float", strategy="channel", dynamic=False, **extra):
    return {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": dynamic, **extra}


def ct_config(*groups, ignore=("lm_head",)):
    config = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
              "config_groups": {f"group_{i}": g for i, g in enumerate(groups)}, "ignore": list(ignore)}
    compressed_tensors.QuantizationConfig.model_validate(config)  # a config compressed-tensors itself accepts
    return config


def test_per_tensor_bf16_scales_and_regex_targets_load_exactly(tmp_path):
    """A [1] bf16 scale becomes the float32 [] scale fp8_tensorwise runs, exactly; "re:" targets and
    the class name match as compressed-tensors matches them."""
    layout = ct_config(group(args(strategy="tensor"), args(strategy="tensor", dynamic=True), targets=["re:.*mlp\\..*", "Linear"]))
    reference, state = write_checkpoint(tmp_path / "ckpt", "tensor", layout, scale_dtype=torch.bfloat16)
    model = load_quantized(tmp_path / "ckpt", empty_llama())
    down = model.model.layers[0].mlp.down_proj
    assert down.weight_scale.dtype == torch.float32 and down.weight_scale.shape == ()
    assert down.weight_scale == state["model.layers.0.mlp.down_proj.weight_scale"].float()
    assert STORED_WEIGHTS.get(down.weight).scheme == "fp8_tensorwise"
    ids = torch.randint(0, 128, (2, 12))
    assert relative_error(logits(model, ids), logits(reference, ids)) < 0.05


@pytest.mark.parametrize("weights, activations, message", [
    (args(strategy="tensor"), args(strategy="tensor"), r"input_activations\.dynamic is false \(static activation scales"),
    (args(), None, r"input_activations is null \(weight-only quantization"),
    ({**args(), "num_bits": 4}, args(strategy="token", dynamic=True), r"weights\.num_bits is 4"),
    ({**args(), "symmetric": False}, args(strategy="token", dynamic=True), r"weights\.symmetric is false"),
    (args(strategy="group", group_size=32), args(strategy="group", dynamic=True, group_size=32), r"weights\.strategy is \"group\""),
], ids=["static-activations", "weight-only", "4-bit", "asymmetric", "group"])
def test_what_fxquant_cannot_run_exactly_is_refused_naming_the_layer_and_field(tmp_path, weights, activations, message):
    write_checkpoint(tmp_path / "ckpt", "channel", ct_config(group(weights, activations)))
    model = tiny_llama(seed=1)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"config\.json: layer 'model\.layers\.0\.self_attn\.q_proj' \(config_groups\.group_0\): " + message):
        load_quantized(tmp_path / "ckpt", model)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
