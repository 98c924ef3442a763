"""DeepSeek-V3-format FP8 checkpoints (transformers' finegrained_fp8, quant_method "fp8"): e4m3 weights
in 128 x 128 blocks with `weight_scale_inv`, experts stored per expert, written here by the test as
DeepSeek quantizes (scale = block amax / 448; DeepSeek dequantizes with weight * weight_scale_inv),
loaded by `fxquant.load_quantized` into a transformers DeepSeek-V3 and run as fp8_blockwise, checked
against a float64 reference of the formula (tests/ops/formula_reference.py)."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import fxquant
from fxquant.passes.stored_weights import STORED_WEIGHTS
from tests.moe_models import build, deepseek_v3_config
from tests.ops.formula_reference import quantize_fp8

transformers = pytest.importorskip("transformers")

FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
EXPERTS = "model.layers.1.mlp.experts"


def deepseek_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantization of w [N, K]: (e4m3 w / s, float32 s [ceil(N / 128), K / 128]), s = block
    amax / 448 (a last block of fewer rows: the amax of those rows)."""
    n, k = w.shape
    padded = torch.cat([w.float(), w.new_zeros(-n % 128, k, dtype=torch.float32)])
    blocks = padded.reshape(-1, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    return (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(-1, k)[:n].contiguous(), scale


def write_deepseek_checkpoint(model, directory, quantization_config=FP8_CONFIG, drop=()):
    """`model` as DeepSeek-V3 ships: every plain Linear but lm_head and every routed expert (per expert,
    gate / up / down) in e4m3 + weight_scale_inv, the rest in bf16; returns the tensors written."""
    linears = {name for name, module in model.named_modules() if type(module) is torch.nn.Linear and name != "lm_head"}
    tensors = {}
    for name, t in model.state_dict().items():
        layer, _, kind = name.rpartition(".")
        if layer in linears:
            tensors[name], tensors[f"{layer}.weight_scale_inv"] = deepseek_quantize(t)
        elif kind in ("gate_up_proj", "down_proj"):
            for e in range(t.shape[0]):
                half = t.shape[1] // 2
                parts = {"gate_proj": t[e, :half], "up_proj": t[e, half:]} if kind == "gate_up_proj" else {"down_proj": t[e]}
                for part, w in parts.items():
                    q, s = deepseek_quantize(w)
                    tensors[f"{layer}.{e}.{part}.weight"], tensors[f"{layer}.{e}.{part}.weight_scale_inv"] = q, s
        else:
            tensors[name] = t.to(torch.bfloat16).contiguous()
    for name in drop:
        del tensors[name]
    directory.mkdir(exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    config = {**model.config.to_dict(), "architectures": ["DeepseekV3ForCausalLM"], "quantization_config": quantization_config}
    (directory / "config.json").write_text(json.dumps(config))
    return tensors


def load(directory, kv_rope=128):
    with fxquant.empty_weights():
        model = build(deepseek_v3_config(kv_rope), dtype=torch.bfloat16)
    return fxquant.load_quantized(directory, model)


def reference_linear(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """float64: x quantized per token per 128 channels (the formula), times q * weight_scale_inv per block (DeepSeek's dequantization)."""
    s, k = x.shape
    _, values, x_scale = quantize_fp8(x.double().reshape(s, k // 128, 128), dims=(2,))
    weight = q.double() * scale_inv.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
    return (values * x_scale).reshape(s, k) @ weight.t()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("deepseek")
    model = build(deepseek_v3_config())
    return model, directory, write_deepseek_checkpoint(model, directory)


def test_every_fp8_tensor_loads_as_stored_fp8_blockwise(checkpoint):
    _, directory, tensors = checkpoint
    model = load(directory)
    q_b = model.model.layers[1].self_attn.q_b_proj
    assert STORED_WEIGHTS[q_b.weight].scheme == "fp8_blockwise"
    assert torch.equal(q_b.weight.view(torch.uint8), tensors["model.layers.1.self_attn.q_b_proj.weight"].view(torch.uint8))
    assert torch.equal(q_b.weight_scale, tensors["model.layers.1.self_attn.q_b_proj.weight_scale_inv"])
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.gate_proj"):  # dense layer, shared expert
        assert STORED_WEIGHTS[model.get_submodule(name).weight].scheme == "fp8_blockwise", name
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.layers[1].mlp.gate.weight.dtype == torch.bfloat16
    experts = model.get_submodule(EXPERTS)
    gate_up, down = experts._parameters["gate_up_proj"], experts._parameters["down_proj"]  # the stored tensors
    assert gate_up.shape == (4, 256, 256) and experts.gate_up_proj_scale.shape == (4, 2, 2)
    assert STORED_WEIGHTS[down].scheme == "fp8_blockwise"
    for e in range(4):
        up = tensors[f"{EXPERTS}.{e}.up_proj.weight"]
        assert torch.equal(gate_up[e, 128:].view(torch.uint8), up.view(torch.uint8))
        assert torch.equal(experts.gate_up_proj_scale[e, 1], tensors[f"{EXPERTS}.{e}.up_proj.weight_scale_inv"][0])
        assert torch.equal(experts.down_proj_scale[e], tensors[f"{EXPERTS}.{e}.down_proj.weight_scale_inv"])


def test_weight_scale_inv_multiplies_as_deepseek_dequantizes(checkpoint):
    """The loaded linear (eager: fxquant::fp8_blockwise_linear) and the loaded experts (the grouped op)
    compute x_q · (q * weight_scale_inv): DeepSeek's convention, not its reciprocal."""
    _, directory, tensors = checkpoint
    model = load(directory)
    torch.manual_seed(1)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model.model.layers[1].self_attn.q_b_proj(x)
    name = "model.layers.1.self_attn.q_b_proj"
    expected = reference_linear(x, tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"])
    torch.testing.assert_close(y.double(), expected.to(torch.bfloat16).double(), rtol=2**-7, atol=1e-3)

    experts = model.get_submodule(EXPERTS)
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    offsets = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    y = torch.ops.fxquant.fp8_blockwise_grouped_mm(x, experts._parameters["gate_up_proj"], experts.gate_up_proj_scale, offsets, None)
    for rows, e in ((slice(0, 2), 0), (slice(2, 5), 2), (slice(5, 6), 3)):
        q = torch.cat([tensors[f"{EXPERTS}.{e}.{part}.weight"] for part in ("gate_proj", "up_proj")])
        scale = torch.cat([tensors[f"{EXPERTS}.{e}.{part}.weight_scale_inv"] for part in ("gate_proj", "up_proj")])
        torch.testing.assert_close(y[rows].double(), reference_linear(x[rows], q, scale).to(torch.bfloat16).double(),
                                   rtol=2**-7, atol=1e-3)


def test_the_loaded_model_runs_with_fxquant(checkpoint):
    """The whole model compiled with fxquant against transformers' model on the dequantized weights
    (bf16 weights equal to q * weight_scale_inv): the difference is FP8 activation quantization and
    the routing choices it flips (measured 6.0 % with issue 18's stored experts merged)."""
    _, directory, tensors = checkpoint
    model = load(directory)
    reference = build(deepseek_v3_config(), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, module in model.named_modules():
            if module is not model and hasattr(module, "weight_scale"):
                reference.get_submodule(name).weight.copy_(deepseek_dequantized(tensors, name))
        ref_experts = reference.get_submodule(EXPERTS)
        for kind in ("gate_up_proj", "down_proj"):
            ours = model.get_submodule(EXPERTS)
            weight = ours._parameters[kind].float() * getattr(ours, f"{kind}_scale").repeat_interleave(128, 1).repeat_interleave(128, 2)
            getattr(ref_experts, kind).copy_(weight)
        ids = torch.randint(0, 64, (1, 7))
        expected = reference(ids).logits.float()
        try:
            actual = torch.compile(model, backend="fxquant")(ids).logits.float()
        except Exception as error:  # noqa: BLE001
            if "are not read yet" in str(error):
                pytest.skip("the passes do not run stored expert weights yet (issue 18, moe-sites)")
            raise
    error = ((actual - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.08, f"fxquant vs the dequantized model: {error:.4f}"


def deepseek_dequantized(tensors: dict, layer: str) -> torch.Tensor:
    q, s = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale_inv"]
    return (q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.bfloat16)


@pytest.mark.parametrize("field, value, reason", [
    ("activation_scheme", "static", "static activation scales"),
    ("scale_fmt", "ue8m0", "fxquant stores float32 scales"),
    ("weight_block_size", [100, 128], "weight_block_size must be two positive multiples of 16"),
])
def test_what_cannot_run_exactly_is_refused_naming_the_field(tmp_path, field, value, reason):
    write_deepseek_checkpoint(build(deepseek_v3_config()), tmp_path, {**FP8_CONFIG, field: value})
    with pytest.raises(ValueError, match=rf"quantization_config.{field} is {re.escape(json.dumps(value))} \(.*{reason}"):
        load(tmp_path)


PARTIAL = "model.layers.0.self_attn.kv_a_proj_with_mqa"  # N = 128 + 64 here (DeepSeek-V3's: 512 + 64)


def test_a_partial_last_block_runs_exactly_in_finer_blocks(tmp_path):
    """N = 192 with 128-row blocks, the last partial (DeepSeek stores a scale row of its own for its 64 rows):
    read as 64-row blocks (gcd(192, 128)), each 128-row scale repeated on its halves: the same dequantized
    weight, the same product."""
    tensors = write_deepseek_checkpoint(build(deepseek_v3_config(kv_rope=64)), tmp_path)
    q, scale_inv = tensors[f"{PARTIAL}.weight"], tensors[f"{PARTIAL}.weight_scale_inv"]
    assert scale_inv.shape == (2, 2)
    layer = load(tmp_path, kv_rope=64).get_submodule(PARTIAL)
    assert layer.weight_scale.shape == (3, 2)
    assert torch.equal(layer.weight_scale, scale_inv.repeat_interleave(2, dim=0)[:3])
    assert STORED_WEIGHTS[layer.weight].options.weight_block_size == (64, 128)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    padded = torch.cat([q.double(), q.new_zeros(64, 256).double()])  # DeepSeek's rule: 128-row blocks, the last cut
    expected = reference_linear(x, padded, scale_inv)[:, :192]
    torch.testing.assert_close(y.double(), expected.to(torch.bfloat16).double(), rtol=2**-7, atol=1e-3)


def test_a_scale_of_no_block_shape_is_refused_naming_the_layer(tmp_path):
    tensors = write_deepseek_checkpoint(build(deepseek_v3_config(kv_rope=64)), tmp_path)
    tensors[f"{PARTIAL}.weight_scale_inv"] = tensors[f"{PARTIAL}.weight_scale_inv"][:1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"layer '{PARTIAL}' \[192, 256\]: N=192 not a multiple of the 128-wide weight block"):
        load(tmp_path, kv_rope=64)


def test_a_missing_expert_tensor_is_named(tmp_path):
    write_deepseek_checkpoint(build(deepseek_v3_config()), tmp_path, drop=[f"{EXPERTS}.3.down_proj.weight_scale_inv"])
    with pytest.raises(ValueError, match=rf"missing \['{EXPERTS}.3.down_proj.weight_scale'\]"):
        load(tmp_path)


def test_transformers_own_finegrained_fp8_loader_reads_the_same_weights(checkpoint, monkeypatch):
    """transformers' loader of the same directory (on the CPU it dequantizes: e4m3 * weight_scale_inv per
    block, experts fused by its conversion mapping) holds exactly fxquant's stored values, dequantized:
    the test's writer is what transformers reads, and fxquant reads the scale as transformers does."""
    import transformers.quantizers.quantizer_finegrained_fp8 as finegrained

    # transformers asks for accelerate before loading FP8, a package fxquant does not depend on; the CPU
    # dequantizing path does not use it.
    monkeypatch.setattr(finegrained, "is_accelerate_available", lambda: True)
    _, directory, _ = checkpoint
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    ours = load(directory)

    def dequantized(weight, scale):
        blocks = scale.repeat_interleave(128, -2).repeat_interleave(128, -1)
        return (weight.float() * blocks).to(torch.bfloat16)

    for name, module in ours.named_modules():
        if hasattr(module, "weight_scale"):
            assert torch.equal(dequantized(module.weight, module.weight_scale), theirs.get_submodule(name).weight), name
    for name in ("gate_up_proj", "down_proj"):
        experts = ours.get_submodule(EXPERTS)
        assert torch.equal(dequantized(experts._parameters[name], getattr(experts, f"{name}_scale")),
                           getattr(theirs.get_submodule(EXPERTS), name)), name
