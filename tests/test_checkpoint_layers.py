"""Every layer the backend quantizes goes into a checkpoint (fxquant/checkpoint_layers.py): load →
save → load round trips bit for bit, GPT-2's Conv1D layers, layers a checkpoint cannot hold, and
stored weights registered with their scheme (passes/stored_weights.py)."""

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fxquant
from fxquant.checkpoint import empty_weights, load_quantized, plan_modules, read_header, save_quantized
from fxquant.config import QuantConfig
from fxquant.passes.stored_weights import register_stored_weight
from tests.models import MLP, MatmulOnWeight, relative_error, tiny_llama, tiny_llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    "fp8_rowwise": QuantConfig(activation_scale_ub=600.0),
    "fp8_blockwise": QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32)),
    "fp8_tensorwise": QuantConfig(scheme="fp8_tensorwise"),
    "int8": QuantConfig(scheme="int8", skip=["lm_head", "*.o_proj"]),
}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def assert_files_equal(first, second) -> None:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(as_bytes(a[name]), as_bytes(b[name])), name


def plan_of(directory) -> list:
    """(layer, shape, scheme) of each plan entry; a stored layer's note says it came stored."""
    return [(e["layer"], e["shape"], e["scheme"]) for e in fxquant.checkpoint.read_metadata(directory)[0]["plan"]]


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_load_save_load_is_bit_exact(tmp_path, scheme):
    """A loaded model (on meta first, partly quantized where the skip list says) saves back the
    stored tensors as they are, with the same plan and scheme per layer, and loads again."""
    config = CONFIGS[scheme]
    save_quantized(tiny_llama(), tmp_path / "first", config)
    with empty_weights():
        loaded = load_quantized(tmp_path / "first", transformers.LlamaForCausalLM(tiny_llama_config()))
    save_quantized(loaded, tmp_path / "second", config)
    assert_files_equal(tmp_path / "first", tmp_path / "second")
    assert plan_of(tmp_path / "first") == plan_of(tmp_path / "second")
    with empty_weights():
        again = load_quantized(tmp_path / "second", transformers.LlamaForCausalLM(tiny_llama_config()))
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize(
    "config, reason",
    [
        (QuantConfig(scheme="int8"), "as fp8_rowwise .* the config asks for int8"),
        (QuantConfig(activation_scale_ub=8.0), "activation_scale_ub 600.0, the config has 8.0"),
        (QuantConfig(activation_scale_ub=600.0, skip=["*up*"]), "the config's skip list has '\\*up\\*'"),
    ],
)
def test_a_stored_layer_that_disagrees_with_the_config_is_refused(tmp_path, config, reason):
    """Stored layers cannot be quantized again: saving them under another scheme, bound or skip list
    is an error naming the layer, before anything is written."""
    save_quantized(MLP(), tmp_path / "first", QuantConfig(activation_scale_ub=600.0))
    loaded = load_quantized(tmp_path / "first", MLP())
    with pytest.raises(ValueError, match=f"layer 'up' is stored quantized.*{reason}"):
        save_quantized(loaded, tmp_path / "second", config)
    assert not (tmp_path / "second").exists()


def test_blockwise_stored_with_another_block_size_is_refused(tmp_path):
    save_quantized(MLP(), tmp_path / "first", QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32)))
    loaded = load_quantized(tmp_path / "first", MLP())
    with pytest.raises(ValueError, match=r"layer 'up' .* weight_block_size \(32, 32\), the config has \(64, 64\)"):
        save_quantized(loaded, tmp_path / "second", QuantConfig(scheme="fp8_blockwise", weight_block_size=(64, 64)))


# GPT-2: Conv1D layers (weight [K, N], addmm(bias, x, W)).


def tiny_gpt2(seed: int = 0):
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


CONV1D_LAYERS = [f"transformer.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.mark.parametrize("via_export", [False, True])
def test_gpt2_conv1d_layers_round_trip(tmp_path, via_export):
    """Every Conv1D is quantized into the checkpoint in its [K, N] layout (what vLLM's GPT-2 loader
    transposes); the loaded model runs eagerly and compiled, with logits within FP8 tolerance of the
    float model's and equal to the fxquant-compiled float model's."""
    model, ids = tiny_gpt2(), torch.randint(0, 128, (2, 8))  # wte and lm_head tied: both names kept by export
    fp8 = QuantConfig(scheme="fp8_rowwise")  # what save_quantized takes for auto; a program keeps its own
    source = fxquant.export(model, (ids,), kwargs={"use_cache": False}, config=fp8) if via_export else model
    metadata = save_quantized(source, tmp_path)
    assert [e["layer"] for e in metadata["plan"] if e["scheme"] == "fp8_rowwise"] == CONV1D_LAYERS
    header = read_header(tmp_path / "model.safetensors")
    assert header["transformer.h.0.mlp.c_fc.weight"] == (torch.float8_e4m3fn, (64, 256))  # [K, N]
    assert header["transformer.h.0.mlp.c_fc.weight_scale"] == (torch.float32, (256, 1))  # [N, 1]
    with empty_weights():
        loaded = load_quantized(tmp_path, transformers.GPT2LMHeadModel(model.config)).eval()
    assert loaded.transformer.h[0].mlp.c_fc.weight.shape == (256, 64)  # held [N, K], as the op takes it
    with torch.no_grad():
        reference = model(ids).logits
        eager = loaded(ids, use_cache=False).logits
        compiled = torch.compile(loaded, backend="fxquant")(ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled_float = torch.compile(model, backend=fxquant.backend(fp8))(ids, use_cache=False).logits
        torch._dynamo.reset()
    assert relative_error(eager, reference) < 0.06  # e4m3 weights and activations: a few % on random weights
    torch.testing.assert_close(compiled, compiled_float, rtol=0, atol=0)
    torch.testing.assert_close(eager, compiled, rtol=1e-5, atol=1e-5)  # Inductor's own fusions of the float ops


@pytest.mark.parametrize("hf_format", ["fbgemm_fp8", "compressed-tensors"])
def test_quantized_conv1d_gets_no_hf_quantization_config(tmp_path, hf_format):
    """transformers' fbgemm_fp8 and compressed-tensors convert nn.Linear only: a config.json claiming
    either for GPT-2 would have transformers read the e4m3 Conv1D weights back as float garbage."""
    with pytest.raises(ValueError, match=f"{hf_format} converts nn.Linear only, not the quantized Conv1D 'transformer.h.0.attn.c_attn'"):
        save_quantized(tiny_gpt2(), tmp_path / "asked", hf_format=hf_format)
    assert not (tmp_path / "asked").exists()
    metadata = save_quantized(tiny_gpt2(), tmp_path / "auto")
    assert "quantization_config" not in metadata
    assert not (tmp_path / "auto" / "config.json").exists()


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_gpt2_conv1d_layers_in_4bit_keep_the_packed_layout(tmp_path, scheme):
    """A packed 4-bit weight ([N, K / 2]) is held as the op takes it in the file, a Conv1D's too (the
    [K, N] transpose is for weights of one value a byte): save_quantized and the streaming CLI write the
    same bytes, and the loaded model runs as the fxquant-compiled float model does."""
    from fxquant.cli import main

    model, ids = tiny_gpt2(), torch.randint(0, 128, (2, 8))
    config = QuantConfig(scheme=scheme)
    metadata = save_quantized(model, tmp_path / "saved", config)
    assert [e["layer"] for e in metadata["plan"] if e["scheme"] == scheme] == CONV1D_LAYERS
    header = read_header(tmp_path / "saved" / "model.safetensors")
    assert header["transformer.h.0.mlp.c_fc.weight"] == (torch.uint8, (256, 32))  # [N, K / 2]
    model.save_pretrained(tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "streamed"), "--scheme", scheme]) == 0
    assert_files_equal(tmp_path / "saved", tmp_path / "streamed")
    with empty_weights():
        loaded = load_quantized(tmp_path / "streamed", transformers.GPT2LMHeadModel(model.config)).eval()
    assert loaded.transformer.h[0].mlp.c_fc.weight.shape == (256, 32)
    with torch.no_grad():
        compiled = torch.compile(loaded, backend="fxquant")(ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled_float = torch.compile(model, backend=fxquant.backend(config))(ids, use_cache=False).logits
        torch._dynamo.reset()
        eager = loaded(ids, use_cache=False).logits
    # the same codes and absmax (the files are equal); a stored 4-bit layer traces as its op, a float one
    # as the module's addmm rewritten, and Inductor fuses the float32 ops around each its own way
    torch.testing.assert_close(compiled, compiled_float, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, compiled, rtol=1e-5, atol=1e-5)


def test_gpt2_loaded_saves_back_bit_exact(tmp_path):
    save_quantized(tiny_gpt2(), tmp_path / "first", QuantConfig(scheme="int8"))
    loaded = load_quantized(tmp_path / "first", tiny_gpt2(seed=1))
    save_quantized(loaded, tmp_path / "second", QuantConfig(scheme="int8"))
    assert_files_equal(tmp_path / "first", tmp_path / "second")


# Matmuls on raw parameters: found only by tracing, not stored by checkpoints.


def test_plan_names_raw_parameters_a_checkpoint_leaves_as_they_are():
    plan = plan_modules(MatmulOnWeight(), QuantConfig())
    assert [(e.layer, e.scheme) for e in plan] == [("w", None), ("v", None)]
    assert all("outside nn.Linear / Conv1D" in e.note for e in plan)


def test_saving_a_program_with_a_raw_parameter_layer_names_it_once(tmp_path):
    program = fxquant.export(MatmulOnWeight(), (torch.randn(2, 64),))
    with pytest.raises(ValueError, match="fxquant: parameter 'w' is multiplied outside an nn.Linear or Conv1D") as error:
        save_quantized(program, tmp_path)
    assert str(error.value).count("'w'") == 1
    assert not tmp_path.joinpath("model.safetensors").exists()


# Stored weights registered with their scheme (metadata, not the scale's shape).


def stored_linear(n: int, scheme: str, scale_shape: tuple, declared: str | None) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(64, n)
    w_q, w_scale = fxquant.SCHEMES[scheme].quantize(linear.weight.detach(), QuantConfig(scheme=scheme).options_for(scheme)).values()
    linear.weight = nn.Parameter(w_q, requires_grad=False)
    linear.register_buffer("weight_scale", w_scale.reshape(scale_shape))
    register_stored_weight(linear, scheme=declared)
    return linear


@pytest.mark.parametrize(
    "n, scheme, scale_shape",
    [(32, "fp8_tensorwise", (1, 1)), (32, "fp8_tensorwise", ()), (1, "fp8_rowwise", (1, 1)), (1, "fp8_tensorwise", (1, 1))],
)
def test_declared_scheme_compiles_and_runs(n, scheme, scale_shape):
    """Tensorwise with a [1, 1] or [] scale; a 1-row layer whose [1, 1] scale is rowwise or tensorwise
    as declared (the two differ in how the activation is quantized)."""
    linear, x = stored_linear(n, scheme, scale_shape, scheme), torch.randn(4, 64) * torch.arange(1, 5)[:, None]
    backend = fxquant.backend()
    with torch.no_grad():
        out = torch.compile(linear, backend=backend)(x)
    op = {"fp8_rowwise": torch.ops.fxquant.fp8_rowwise_linear, "fp8_tensorwise": torch.ops.fxquant.fp8_tensorwise_linear}[scheme]
    scale = linear.weight_scale.reshape([n] if scheme == "fp8_rowwise" else [])
    assert torch.equal(out, op(x, linear.weight, scale, linear.bias, None))
    assert backend.plans[0][0].scheme == scheme


@pytest.mark.parametrize("declared, scale_shape", [("fp8_rowwise", ()), ("fp8_blockwise", ()), ("int8", (32, 1))])
def test_declared_scheme_that_does_not_fit_its_tensors_names_the_layer(declared, scale_shape):
    linear = stored_linear(32, "fp8_tensorwise" if scale_shape == () else "fp8_rowwise", scale_shape, declared)
    model = nn.Sequential(linear)
    with pytest.raises(Exception, match=f"layer '0': stored as {declared}, but its weight is torch.float8_e4m3fn"):
        torch.compile(model, backend="fxquant")(torch.randn(2, 64))
