"""`fxquant.quantize_` (fxquant/quantize_inplace.py): a model's linear layers quantized in place. The
compiled quantized model equals the compiled float model bit for bit (CPU), runs eagerly, holds each
quantized weight once (merged layers in the compiled graph's stacked buffers), and saves as stored."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fxquant
from fxquant import QuantConfig
from fxquant.stored_layers import StoredLayer
from tests.models import relative_error, tiny_llama


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
