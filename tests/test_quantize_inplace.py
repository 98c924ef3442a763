"""`fxquant.quantize_` (fxquant/quantize_inplace.py): a model's linear layers and MoE expert weights
quantized in place. The compiled quantized model equals the compiled float model bit for bit (CPU),
runs eagerly, holds each quantized weight once (merged layers in the compiled graph's stacked
buffers), and saves as stored."""

import copy
import weakref

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

import fxquant
from fxquant import QuantConfig
from fxquant.quantize_inplace import EAGER_NOTE
from fxquant.stored_experts import StoredExperts
from fxquant.stored_layers import StoredLayer
from tests.models import MOE_MODELS, relative_error, tiny_llama


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def compiled_logits(model, tokens, dynamic=None):
    """Compiled with fp8_rowwise: what quantize_ takes for "auto" (a float model compiled on this CPU
    would take int8); stored weights run as stored."""
    with torch.no_grad():
        return torch.compile(model, backend=fxquant.backend(scheme="fp8_rowwise"), dynamic=dynamic)(tokens).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2 (Conv1D)"])
def test_the_compiled_model_equals_compiling_the_float_model_bit_for_bit(make):
    model = make()
    quantized = copy.deepcopy(model)
    plan = fxquant.quantize_(quantized)
    tokens = torch.randint(0, 64, (2, 7))
    expected = compiled_logits(model, tokens)
    torch.testing.assert_close(compiled_logits(quantized, tokens), expected, rtol=0, atol=0)
    with torch.no_grad():  # eagerly: fxquant's ops, layer by layer, the same numerics up to fusion
        assert relative_error(quantized(tokens).logits, expected) < 1e-5
    rewritten = {entry.layer for entry in plan.rewritten}
    assert rewritten and "lm_head" not in rewritten
    for layer in rewritten:
        module = quantized.get_submodule(layer)
        assert isinstance(module, StoredLayer) and module.weight.dtype == torch.float8_e4m3fn
        assert not module.weight.requires_grad and module.weight_scale.dtype == torch.float32


def test_each_quantized_weight_is_held_once_and_merged_layers_share_the_graphs_stacks():
    model = tiny_llama()
    fxquant.quantize_(model)
    attention = model.model.layers[0].self_attn
    backend = fxquant.backend()
    with torch.no_grad():
        compiled = torch.compile(model, backend=backend, dynamic=False)
        compiled(torch.randint(0, 64, (2, 7)))
        compiled(torch.randint(0, 64, (2, 9)))  # a second graph of the same model
    storages = {p.untyped_storage().data_ptr() for p in (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)}
    assert len(storages) == 1, "q, k and v are not views of one stacked buffer"
    stacked = attention.q_proj.weight.untyped_storage().nbytes()
    assert stacked == sum(p.weight.numel() for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    notes = {row.layer: row.note for row in backend.plans[-1]}
    assert notes["model.layers.0.self_attn.q_proj"].endswith("one GEMM with k_proj, v_proj")
    assert fxquant.quantized_copies(model) == [], "the backend made quantized copies of stored weights"


def test_it_saves_as_stored_and_loads_back_to_the_same_outputs(tmp_path):
    model = tiny_llama()
    fxquant.quantize_(model)
    fxquant.save_quantized(model, tmp_path / "ckpt")
    with fxquant.empty_weights():
        loaded = type(model)(model.config)
    fxquant.load_quantized(tmp_path / "ckpt", loaded)
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens).logits, model(tokens).logits, rtol=0, atol=0)


# relative error of the logits against the float model's, at this model's size (measured 0.06, 0.18, 0.015)
T5_BOUNDS = {"fp8_rowwise": 0.1, "nf4": 0.3, "int8": 0.05}


@pytest.mark.parametrize("scheme", list(T5_BOUNDS))
def test_t5_runs_with_the_layers_transformers_keeps_in_float32_left_float(scheme, tmp_path):
    """T5's feed-forward casts its activation to `wo.weight.dtype` (T5PreTrainedModel._keep_in_fp32_modules):
    a quantized `wo` would turn the activation into codes. `wo` stays float with the reason, the other
    layers are quantized; the model runs eagerly near the float model, and a saved and loaded copy
    gives the same logits."""
    torch.manual_seed(0)
    config = T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    quantized = copy.deepcopy(model)
    plan = fxquant.quantize_(quantized, QuantConfig(scheme=scheme))
    wo = [entry for entry in plan if entry.layer.endswith(".wo")]
    assert len(wo) == 4 and all(entry.scheme is None and "_keep_in_fp32_modules" in entry.note for entry in wo)
    assert all(quantized.get_submodule(entry.layer).weight.dtype == torch.float32 for entry in wo)
    assert {entry.scheme for entry in plan.rewritten} == {scheme} and len(plan.rewritten) == 28
    ids, start = torch.tensor([[3, 9, 14, 2, 40, 7]]), torch.zeros(1, 3, dtype=torch.long)
    fxquant.save_quantized(quantized, tmp_path / "ckpt", QuantConfig(scheme=scheme))
    with fxquant.empty_weights():
        loaded = T5ForConditionalGeneration(config)
    fxquant.load_quantized(tmp_path / "ckpt", loaded)
    with torch.no_grad():
        expected, logits = model(input_ids=ids, decoder_input_ids=start).logits, quantized(input_ids=ids, decoder_input_ids=start).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids, decoder_input_ids=start).logits, logits, rtol=0, atol=0)
    assert relative_error(logits, expected) < T5_BOUNDS[scheme]


def test_a_weight_tied_to_an_embedding_is_quantized_for_the_layer_and_kept_for_the_embedding():
    model = tiny_gpt2()  # lm_head.weight is wte.weight
    fxquant.quantize_(model, QuantConfig(skip=()))
    assert model.lm_head.weight.dtype == torch.float8_e4m3fn
    assert model.transformer.wte.weight.dtype == torch.float32
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 5)))


@pytest.mark.parametrize(
    "config, meta, match",
    [
        (QuantConfig(scheme="fp8_tensorwise", static_activation_amax={"model.layers.0.mlp.up_proj": 1.0}), False, "static_activation_amax"),
        (None, True, "meta device"),
    ],
    ids=["folded scales", "meta weights"],
)
def test_it_refuses_before_changing_anything(config, meta, match):
    model = tiny_llama()
    if meta:
        model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(128, 64, device="meta"))
    before = {name: (p.dtype, p.device) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        fxquant.quantize_(model, config)
    assert {name: (p.dtype, p.device) for name, p in model.named_parameters()} == before
    assert not any(isinstance(m, StoredLayer) for m in model.modules())


@pytest.mark.parametrize("model, implementation", [("qwen3_moe", "batched_mm"), ("gpt_oss", "grouped_mm")],
                         ids=["qwen3-moe batched_mm", "gpt-oss grouped_mm (transposed experts, biases)"])
def test_moe_experts_are_quantized_in_place_and_compile_to_the_float_models_outputs(model, implementation):
    """Expert weights become [E, N, K] e4m3 with [E, N] scales (gpt-oss's [E, K, N] too); compiled, the
    model equals the compiled float model bit for bit (its graph is the float model's with the stored
    tensors in place of the quantized copies); eagerly, the same ops on the same tensors."""
    float_model = MOE_MODELS[model](implementation)  # 2 layers: one graph serves both experts modules eagerly
    quantized = copy.deepcopy(float_model)
    experts = quantized.model.layers[0].mlp.experts
    float_weight = weakref.ref(experts.gate_up_proj)
    plan = fxquant.quantize_(quantized)
    rows = {row.layer: row for row in plan}
    assert rows["model.layers.0.mlp.experts.gate_up_proj"].scheme == rows["model.layers.0.mlp.experts.down_proj"].scheme == "fp8_rowwise"
    assert "4 of 4 expert weights quantized" in str(plan)
    assert float_weight() is None, "the float expert weight is still held"
    weight = experts._parameters["gate_up_proj"]
    assert (weight.dtype, tuple(weight.shape), tuple(experts.gate_up_proj_scale.shape)) == (torch.float8_e4m3fn, (8, 64, 64), (8, 64))
    assert isinstance(experts, StoredExperts) and not weight.requires_grad
    tokens = torch.randint(0, 64, (2, 7))
    expected = compiled_logits(float_model, tokens)
    backend = fxquant.backend()
    with torch.no_grad():
        actual = torch.compile(quantized, backend=backend)(tokens).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    notes = {row.layer: row.note for row in backend.plans[0]}
    assert notes["model.layers.0.mlp.experts.down_proj"] == "stored quantized weights"
    with torch.no_grad():
        assert relative_error(quantized(tokens).logits, expected) < 1e-5


def test_experts_of_the_eager_implementation_stay_float_with_the_reason_and_stored_ones_refuse_it():
    model = MOE_MODELS["mixtral"]("eager", layers=1)
    plan = fxquant.quantize_(model)
    row = {row.layer: row for row in plan}["model.layers.0.mlp.experts.gate_up_proj"]
    assert row.scheme is None and row.note == EAGER_NOTE
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    stored = MOE_MODELS["mixtral"]("batched_mm", layers=1)
    fxquant.quantize_(stored)
    stored.config._experts_implementation = "eager"  # its loop would read the e4m3 weight outside any graph
    with torch.no_grad(), pytest.raises(RuntimeError, match="StoredMixtralExperts.gate_up_proj is stored torch.float8_e4m3fn.*'eager'"):
        stored(torch.randint(0, 64, (1, 5)))


def test_quantizing_again_keeps_stored_experts_as_they_are():
    model = MOE_MODELS["qwen3_moe"]("batched_mm", layers=1)
    fxquant.quantize_(model)
    experts = model.model.layers[0].mlp.experts
    weight = experts._parameters["gate_up_proj"]
    plan = fxquant.quantize_(model)
    row = {row.layer: row for row in plan}["model.layers.0.mlp.experts.gate_up_proj"]
    assert (row.scheme, row.note) == ("fp8_rowwise", "stored quantized weights")
    assert experts._parameters["gate_up_proj"] is weight


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_moe_experts_quantized_in_place_compile_on_cuda_as_the_float_model_does(implementation):
    """bf16 on the GPU (torch's grouped_mm, fxquant's expert ops and lowerings): the stored model's
    compiled graph is the float model's with the stored tensors, so the outputs agree (bit for bit
    where Inductor makes the same choices for both; within FP8's rounding of a few activations else)."""
    float_model = MOE_MODELS["qwen3_moe"](implementation).to("cuda", torch.bfloat16)
    quantized = copy.deepcopy(float_model)
    fxquant.quantize_(quantized)
    tokens = torch.randint(0, 64, (2, 16), device="cuda")
    expected = compiled_logits(float_model, tokens)
    torch._dynamo.reset()
    actual = compiled_logits(quantized, tokens)
    assert relative_error(actual, expected) < 1e-2
    with torch.no_grad():
        assert relative_error(quantized(tokens).logits, expected) < 5e-2


def test_a_quantized_moe_model_saves_per_expert_and_loads_back_to_the_same_outputs(tmp_path):
    """Stored experts (quantize_) are written one tensor per expert and joined back by load_quantized."""
    from tests.models import tiny_qwen3_moe

    model = tiny_qwen3_moe()
    fxquant.quantize_(model)
    fxquant.save_quantized(model, tmp_path / "ckpt")
    with fxquant.empty_weights():
        loaded = type(model)(model.config)
    fxquant.load_quantized(tmp_path / "ckpt", loaded)
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens).logits, model(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8", "fp8_rowwise"])
def test_a_second_quantized_model_of_the_class_compiles_with_its_own_scales(scheme):
    """The rewrite bakes a stored weight's scales into the graph while Dynamo passes the weight as an
    input: compiling a second model of the same class must not reuse the first one's graph (it ran with
    the first model's scales: logits off by 90 % where the weights differ tenfold)."""
    torch.manual_seed(0)
    first, second = torch.nn.Sequential(torch.nn.Linear(64, 64)), torch.nn.Sequential(torch.nn.Linear(64, 64))
    with torch.no_grad():
        second[0].weight.mul_(10)
    x = torch.randn(4, 64)
    for model in (first, second):
        fxquant.quantize_(model, QuantConfig(scheme=scheme, skip=[]))
    torch._dynamo.reset()
    with torch.no_grad():
        for model in (first, second):  # no reset between them
            torch.testing.assert_close(torch.compile(model, backend="fxquant")(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_stored_llm_int8_layer_compiles_with_its_own_threshold():
    """An option the compile's config does not set is the stored layer's: a layer quantized with
    threshold 0 (plain int8) compiles with 0, not llm_int8's default 6.0 (it did: outlier columns in 16-bit)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    fxquant.quantize_(model, QuantConfig(scheme="llm_int8", skip=[], scheme_options={"llm_int8": {"threshold": 0.0}}))
    x = torch.randn(4, 64)
    x[:, 5] = 40.0  # an outlier column: threshold 6 would keep it in 16-bit
    torch._dynamo.reset()
    backend = fxquant.backend()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x), rtol=1e-5, atol=1e-5)
    (entry,) = backend.plans[-1].rewritten
    assert "threshold 0 from the checkpoint" in entry.note


def test_experts_a_checkpoint_cannot_hold_quantized_are_refused_before_writing(tmp_path):
    """gpt-oss's fused experts have no per-expert names in transformers' layout, so a checkpoint stores
    them as they are; quantized in place, that would be e4m3 codes under plan rows that say float."""
    model = MOE_MODELS["gpt_oss"]("grouped_mm")
    fxquant.quantize_(model, QuantConfig(scheme="fp8_rowwise"))
    assert model.model.layers[0].mlp.experts._parameters["gate_up_proj"].dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.gate_up_proj is held quantized \(torch.float8_e4m3fn\)"):
        fxquant.save_quantized(model, tmp_path / "ckpt", QuantConfig(scheme="fp8_rowwise"))
    assert not (tmp_path / "ckpt").exists()
