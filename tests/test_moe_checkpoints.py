"""Checkpoints of MoE expert weights (fxquant/checkpoint_experts.py): one tensor per expert under the
names HF checkpoints use (compressed-tensors, what vLLM and transformers read), checked against the
quantization formula written again in float64 (tests/ops/formula_reference.py), read back by
transformers' own loader and by load_quantized into the fused [E, N, K] form; faults named."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxquant
from fxquant import QuantConfig
from fxquant.checkpoint import read_header
from fxquant.passes.stored_weights import STORED_WEIGHTS
from tests.moe_models import build, mixtral_config, qwen3_moe_config
from tests.ops.formula_reference import quantize_fp8

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

ROWWISE = QuantConfig(scheme="fp8_rowwise")
BLOCKWISE = QuantConfig(scheme="fp8_blockwise")
# (config, QuantConfig, per-expert names of gate_up_proj's parts)
CASES = {
    "qwen3_moe-rowwise": (qwen3_moe_config(), ROWWISE, ("gate_proj", "up_proj")),
    "mixtral-rowwise": (mixtral_config(), ROWWISE, ("w1", "w3")),
    "qwen3_moe-blockwise": (qwen3_moe_config(width=128, expert_width=128), BLOCKWISE, ("gate_proj", "up_proj")),
}
EXPERTS = "model.layers.0.mlp.experts"


def formula(weight: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 bytes, float32 scale in the file's layout) of one expert's [N, K] part, from the formula."""
    if config.scheme == "fp8_rowwise":
        codes, _, scale = quantize_fp8(weight, dims=(-1,))
        return codes, scale.float()  # [N, 1]
    n, k = weight.shape
    codes, _, scale = quantize_fp8(weight.double().reshape(n // 128, 128, k // 128, 128), dims=(1, 3))
    return codes.reshape(n, k), scale[:, 0, :, 0].float()


def save(case, directory, **kwargs):
    model_config, config, parts = CASES[case]
    model = build(model_config)
    metadata = fxquant.save_quantized(model, directory, config, **kwargs)
    return model, metadata, config, parts


@pytest.mark.parametrize("case", CASES)
def test_experts_are_stored_one_tensor_per_expert_under_hf_names(tmp_path, case):
    model, metadata, config, (gate, up) = save(case, tmp_path)
    header = read_header(tmp_path / "model.safetensors")
    stored = load_file(tmp_path / "model.safetensors")
    experts = model.get_submodule(EXPERTS)
    width = experts.gate_up_proj.shape[1] // 2
    assert f"{EXPERTS}.gate_up_proj" not in header and f"{EXPERTS}.down_proj" not in header
    for e in range(experts.gate_up_proj.shape[0]):
        for part, weight in ((gate, experts.gate_up_proj[e, :width]), (up, experts.gate_up_proj[e, width:]),
                             ("w2" if gate == "w1" else "down_proj", experts.down_proj[e])):
            codes, scale = formula(weight.detach(), config)
            name = f"{EXPERTS}.{e}.{part}"
            assert header[f"{name}.weight"] == (torch.float8_e4m3fn, tuple(weight.shape))
            assert torch.equal(stored[f"{name}.weight"].view(torch.uint8), codes), f"{name}.weight: bytes differ from the formula"
            assert torch.equal(stored[f"{name}.weight_scale"], scale), f"{name}.weight_scale differs from the formula"
    row = next(row for row in metadata["plan"] if row["layer"] == f"{EXPERTS}.gate_up_proj")
    assert (row["scheme"], row["experts"], row["expert_names"]) == (
        config.scheme, 4, [f"{EXPERTS}.{{e}}.{gate}", f"{EXPERTS}.{{e}}.{up}"])
    quantization_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quantization_config["quant_method"] == "compressed-tensors"  # fbgemm_fp8 describes no experts
    assert quantization_config["config_groups"]["group_0"]["targets"] == ["Linear"]
    if case.startswith("qwen3"):  # the router, a raw parameter, is ignored by its module's name (vLLM runs it as a Linear)
        assert "model.layers.0.mlp.gate" in quantization_config["ignore"]


@pytest.mark.parametrize("case", CASES)
def test_load_quantized_joins_the_experts_into_their_fused_stored_form(tmp_path, case):
    model, _, config, _ = save(case, tmp_path / "a")
    model_config = CASES[case][0]
    with fxquant.empty_weights():
        loaded = build(model_config)
    fxquant.load_quantized(tmp_path / "a", loaded)
    experts = loaded.get_submodule(EXPERTS)
    original = model.get_submodule(EXPERTS)
    e, n, k = original.gate_up_proj.shape
    weight = experts._parameters["gate_up_proj"]  # the stored tensor itself (a trace may see it presented as float)
    assert weight.dtype == torch.float8_e4m3fn and weight.shape == (e, n, k) and not weight.requires_grad
    stored = STORED_WEIGHTS[weight]
    assert (stored.scheme, stored.weight_name) == (config.scheme, "gate_up_proj")
    for expert in range(e):
        codes, scale = formula(original.gate_up_proj[expert].detach(), config)
        assert torch.equal(weight[expert].view(torch.uint8), codes)
        assert torch.equal(experts.gate_up_proj_scale[expert], scale.reshape(experts.gate_up_proj_scale[expert].shape))
    expected_scale = (e, n) if config.scheme == "fp8_rowwise" else (e, n // 128, k // 128)  # the op's layout
    assert tuple(experts.gate_up_proj_scale.shape) == expected_scale
    fxquant.save_quantized(loaded, tmp_path / "b", config)  # written back as stored, bit for bit
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("case", ["qwen3_moe-rowwise", "mixtral-rowwise"])
def test_transformers_loads_the_per_expert_checkpoint(tmp_path, case):
    """transformers' own loader (compressed-tensors quantization_config) fuses the per-expert tensors
    through its conversion mapping and dequantizes them (on the CPU it runs experts in float): exactly
    fxquant's e4m3 values times their scales, as fxquant's own load holds them."""
    save(case, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).get_submodule(EXPERTS)
    with fxquant.empty_weights():
        ours = build(CASES[case][0])
    fxquant.load_quantized(tmp_path, ours)
    ours = ours.get_submodule(EXPERTS)
    for name in ("gate_up_proj", "down_proj"):
        dequantized = ours._parameters[name].float() * getattr(ours, f"{name}_scale").unsqueeze(-1)
        assert torch.equal(getattr(theirs, name).detach(), dequantized), f"{name}: transformers loads other values"


def test_a_scheme_without_an_expert_form_stores_the_experts_as_they_are(tmp_path):
    model = build(qwen3_moe_config())
    metadata = fxquant.save_quantized(model, tmp_path, QuantConfig(scheme="int8"))
    row = next(row for row in metadata["plan"] if row["layer"] == f"{EXPERTS}.gate_up_proj")
    assert row["scheme"] is None and row["note"] == "int8 has no grouped form for expert weights"
    assert read_header(tmp_path / "model.safetensors")[f"{EXPERTS}.gate_up_proj"] == (torch.float32, (4, 64, 64))
    with fxquant.empty_weights():
        loaded = build(qwen3_moe_config())
    fxquant.load_quantized(tmp_path, loaded)
    assert torch.equal(loaded.get_submodule(EXPERTS).gate_up_proj, model.get_submodule(EXPERTS).gate_up_proj)


def test_expert_parts_not_whole_blocks_are_stored_as_they_are_with_the_reason(tmp_path):
    """fp8_blockwise on gate_up_proj [E, 2 x 64, 128]: each expert's gate and up halves are 64 rows, not whole
    128-row blocks, so the per-expert layout cannot hold them."""
    model = build(qwen3_moe_config(width=128, expert_width=64))
    metadata = fxquant.save_quantized(model, tmp_path, BLOCKWISE)
    rows = {row["layer"]: row for row in metadata["plan"]}
    assert rows[f"{EXPERTS}.gate_up_proj"]["scheme"] is None
    assert rows[f"{EXPERTS}.gate_up_proj"]["note"] == (
        "fp8_blockwise's weight_scale [4, 1, 1] does not cut into 2 per-expert parts along N")
    assert rows[f"{EXPERTS}.down_proj"]["note"] == "K=64 not a multiple of the 128-wide weight block"


def _without_fxquant_json(directory):
    (directory / "fxquant.json").unlink()


def test_a_missing_expert_tensor_is_named(tmp_path):
    save("qwen3_moe-rowwise", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[f"{EXPERTS}.2.up_proj.weight_scale"]
    save_file(tensors, tmp_path / "model.safetensors")
    with fxquant.empty_weights():
        model = build(qwen3_moe_config())
    with pytest.raises(ValueError, match=rf"tensor '{EXPERTS}.2.up_proj.weight_scale' is absent; fxquant.json records"):
        fxquant.load_quantized(tmp_path, model)
    _without_fxquant_json(tmp_path)  # read as a compressed-tensors checkpoint others made
    with pytest.raises(ValueError, match=rf"does not fit the model .*missing \['{EXPERTS}.2.up_proj.weight_scale'\]"):
        fxquant.load_quantized(tmp_path, model)
    assert model.get_submodule(EXPERTS).gate_up_proj.is_meta, "the model was changed before the error"


def test_a_tampered_expert_shape_is_named(tmp_path):
    save("qwen3_moe-rowwise", tmp_path)
    _without_fxquant_json(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[f"{EXPERTS}.1.gate_proj.weight"] = tensors[f"{EXPERTS}.1.gate_proj.weight"][:16].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with fxquant.empty_weights():
        model = build(qwen3_moe_config())
    with pytest.raises(ValueError, match=rf"tensor '{EXPERTS}.1.gate_proj.weight' is torch.float8_e4m3fn \[16, 64\]; "
                                         r"the model needs torch.float8_e4m3fn, shape \[32, 64\]"):
        fxquant.load_quantized(tmp_path, model)


def test_a_checkpoint_of_other_experts_is_refused_naming_the_expert_weight(tmp_path):
    save("qwen3_moe-rowwise", tmp_path)
    with fxquant.empty_weights():
        model = build(qwen3_moe_config(experts=8))
    with pytest.raises(ValueError, match=rf"expert weight '{EXPERTS}.gate_up_proj' was quantized from an E x N x K = "
                                         r"4 x 64 x 64 parameter, but the model's is \[8, 64, 64\]"):
        fxquant.load_quantized(tmp_path, model)


def test_an_edited_expert_count_is_refused(tmp_path):
    save("qwen3_moe-rowwise", tmp_path)
    metadata = json.loads((tmp_path / "fxquant.json").read_text())
    row = next(row for row in metadata["plan"] if row["layer"] == f"{EXPERTS}.down_proj")
    row["experts"] = 5
    (tmp_path / "fxquant.json").write_text(json.dumps(metadata))
    with fxquant.empty_weights():
        model = build(qwen3_moe_config())
    with pytest.raises(ValueError, match=rf"the plan quantizes layer '{EXPERTS}.down_proj' \(fp8_rowwise\), but the tensor "
                                         rf"table has no '{EXPERTS}.4.down_proj.weight'"):
        fxquant.load_quantized(tmp_path, model)


@pytest.mark.parametrize("config", [ROWWISE, QuantConfig(rules={"*.experts.*": "fp8_blockwise"})], ids=["one scheme", "mixed"])
def test_without_fxquant_json_the_compressed_tensors_config_alone_gives_the_same_model(tmp_path, config):
    """Read as a checkpoint others made (llm-compressor's layout): each expert a Linear that config
    groups target ("Linear", or by name in a mixed checkpoint); the same tensors, schemes and options."""
    model = build(qwen3_moe_config(width=128, expert_width=128))
    metadata = fxquant.save_quantized(model, tmp_path, config)
    if config.rules:
        groups = metadata["quantization_config"]["config_groups"]
        assert f"{EXPERTS}.3.up_proj" in groups["group_1"]["targets"] and "model.layers.0.self_attn.q_proj" in groups["group_0"]["targets"]
    loaded = {}
    for case in ("fxquant.json", "config.json alone"):
        if case != "fxquant.json":
            _without_fxquant_json(tmp_path)
        with fxquant.empty_weights():
            loaded[case] = build(qwen3_moe_config(width=128, expert_width=128))
        fxquant.load_quantized(tmp_path, loaded[case])
    ours, theirs = loaded.values()
    for name, tensor in ours.state_dict().items():
        other = theirs.state_dict()[name]
        assert tensor.dtype == other.dtype and torch.equal(tensor.view(torch.uint8), other.view(torch.uint8)), name
    for name in ("gate_up_proj", "down_proj"):
        stored = [STORED_WEIGHTS[model.get_submodule(EXPERTS)._parameters[name]] for model in (ours, theirs)]
        assert stored[0].scheme == stored[1].scheme == ("fp8_blockwise" if config.rules else "fp8_rowwise")
        assert stored[0].options == stored[1].options


def test_fbgemm_fp8_cannot_describe_expert_weights(tmp_path):
    with pytest.raises(ValueError, match=rf"fbgemm_fp8 converts nn.Linear only, not the expert weight '{EXPERTS}.gate_up_proj'"):
        fxquant.save_quantized(build(qwen3_moe_config()), tmp_path, hf_format="fbgemm_fp8")
    assert not tmp_path.joinpath("model.safetensors").exists()


def test_the_plan_command_lists_the_expert_weights(tmp_path, capsys):
    from fxquant.cli import main

    build(qwen3_moe_config()).save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{EXPERTS}.gate_up_proj  grouped_mm  4 x 64 x 64  fp8_rowwise" in out
    assert out.rstrip().endswith("4 of 6 linear layers and 2 of 2 expert weights quantized")


def test_inspect_counts_expert_weights_apart_and_says_why_a_layer_stayed(tmp_path, capsys):
    from fxquant.cli import main

    source, out = tmp_path / "in", tmp_path / "out"
    build(qwen3_moe_config()).save_pretrained(source)
    assert main(["quantize", str(source), str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "4 of 6 linear layers and 2 of 2 expert weights quantized; left as they were: " in report
    assert re.search(rf"\n{re.escape(EXPERTS)}\.down_proj +fp8_rowwise +[0-9,]+ +[0-9,]+ +0\.\d\dx\n", report)
    assert re.search(r"\nlm_head +- +[0-9,]+ +[0-9,]+ +1\.00x +skipped by skip list \(lm_head\)\n", report)
