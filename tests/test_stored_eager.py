"""A model loaded by load_quantized runs without compiling (fxquant/stored_layers.py): through
fxquant's ops, with the numerics compiling gives, checked against an independent float64 reference."""

import pytest
import torch
from torch import nn

import fxquant
from fxquant.checkpoint import empty_weights, load_quantized, save_quantized
from fxquant.config import QuantConfig
from fxquant.stored_layers import StoredLayer, make_stored
from tests.models import MLP

SCHEMES = ["fp8_rowwise", "fp8_blockwise", "fp8_tensorwise", "int8"]
CONFIGS = {
    "fp8_rowwise": QuantConfig(activation_scale_ub=20.0),
    "fp8_blockwise": QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32)),
    "fp8_tensorwise": QuantConfig(scheme="fp8_tensorwise"),
    "int8": QuantConfig(scheme="int8"),
}
FP8_MAX, FP8_MIN_SCALE = 448.0, 1.0 / (448.0 * 512.0)


def loaded_mlp(tmp_path, config: QuantConfig) -> tuple[MLP, MLP]:
    torch.manual_seed(0)
    model = MLP().eval()
    save_quantized(model, tmp_path, config)
    with empty_weights():
        loaded = load_quantized(tmp_path, MLP())
    return model, loaded.eval()


def reference_quantize(x: torch.Tensor, scheme: str, config: QuantConfig) -> torch.Tensor:
    """The activation as the scheme quantizes it, dequantized, in float64: scales per token (per
    group of block_k for blockwise, per tensor for tensorwise) computed by the README's formula."""
    x = x.double()
    group = {"fp8_tensorwise": x.numel(), "fp8_blockwise": config.weight_block_size[1]}.get(scheme, x.shape[-1])
    g = x.reshape(-1, group)
    amax = g.abs().amax(dim=-1, keepdim=True)
    if scheme == "int8":
        scale = (amax.clamp(min=1e-8) / 127).float().double()
        return ((g.float() / scale.float()).double().round().clamp(-127, 127) * scale).reshape(x.shape)
    if config.activation_scale_ub is not None:
        amax = amax.clamp(max=config.activation_scale_ub)
    scale = (amax / FP8_MAX).float().clamp(min=FP8_MIN_SCALE)
    codes = (g.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (codes.double() * scale.double()).reshape(x.shape)


def reference_linear(layer: nn.Linear, x: torch.Tensor, scheme: str, config: QuantConfig) -> torch.Tensor:
    """float64: quantized activation @ (w_q * scale).T + bias, the weight dequantized from the stored tensors."""
    w, scale = layer.weight.double(), layer.weight_scale.double()
    if scheme == "fp8_blockwise":
        scale = scale.repeat_interleave(w.shape[0] // scale.shape[0], 0).repeat_interleave(w.shape[1] // scale.shape[1], 1)
    y = reference_quantize(x, scheme, config) @ (w * scale.reshape(scale.shape if scale.dim() == 2 else (-1, 1))).t()
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loaded_model_runs_eagerly_with_the_compiled_numerics(tmp_path, scheme):
    config = CONFIGS[scheme]
    _, loaded = loaded_mlp(tmp_path, config)
    x = torch.randn(5, 64) * 4
    with torch.no_grad():
        eager = loaded(x)
        hidden = torch.nn.functional.gelu(loaded.up(x))
        torch._dynamo.reset()
        compiled = torch.compile(loaded, backend=fxquant.backend(config))(x)
    # The same reference ops run eagerly and compiled on the CPU; Inductor's gelu may differ in the last bit.
    torch.testing.assert_close(eager, compiled, rtol=1e-5, atol=1e-5)
    # Each stored layer: within float32 accumulation of an independent float64 reference.
    torch.testing.assert_close(loaded.up(x).double(), reference_linear(loaded.up, x, scheme, config), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.down(hidden).double(), reference_linear(loaded.down, hidden, scheme, config), rtol=1e-5, atol=1e-5)


def test_stored_layers_keep_their_class_keys_and_repr(tmp_path):
    model, loaded = loaded_mlp(tmp_path, QuantConfig())
    assert isinstance(loaded.up, nn.Linear) and isinstance(loaded.up, StoredLayer)
    assert type(loaded.lm_head) is nn.Linear  # skipped: left as it was
    assert set(loaded.state_dict()) == set(model.state_dict()) | {"up.weight_scale", "down.weight_scale"}
    assert repr(loaded.up) == "StoredLinear(in_features=64, out_features=128, bias=True, stored fp8_rowwise)"
    assert type(loaded.up) is type(loaded.down)  # one class per base class


def test_compiling_a_loaded_model_plans_its_stored_layers(tmp_path):
    _, loaded = loaded_mlp(tmp_path, QuantConfig(scheme="int8"))
    backend = fxquant.backend()
    with torch.no_grad():
        torch.compile(loaded, backend=backend)(torch.randn(2, 64))
    assert [(e.layer, e.scheme, e.note) for e in backend.plans[0].rewritten] == [
        ("up", "int8", "stored quantized weights"), ("down", "int8", "stored quantized weights")
    ]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_another_backend_stops_with_a_message_naming_fxquants(tmp_path, backend):
    # the weight is presented to Dynamo as fxquant::stored_weight, which only fxquant's rewrite removes
    _, loaded = loaded_mlp(tmp_path, CONFIGS["fp8_rowwise"])
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match=r"stored torch.float8_e4m3fn weight \[128, 64\] ran outside fxquant's rewrite; compile the model with backend='fxquant'"):
        torch.compile(loaded, backend=backend)(torch.randn(2, 64))


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8"])
def test_exported_loaded_model_equals_its_eager_run(tmp_path, scheme):
    _, loaded = loaded_mlp(tmp_path, CONFIGS[scheme])
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fxquant.export(loaded, (x,)).module()(x), loaded(x))


def test_make_stored_on_a_plain_linear():
    """The entry point in-place quantization uses: a Linear given a stored weight and scale."""
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 32), torch.randn(4, 64)
    w_q, w_scale = fxquant.SCHEMES["int8"].quantize(linear.weight.detach(), None).values()
    linear.weight = nn.Parameter(w_q, requires_grad=False)
    linear.register_buffer("weight_scale", w_scale)
    make_stored(linear, "int8")
    with torch.no_grad():
        assert torch.equal(linear(x), torch.ops.fxquant.int8_linear(x, w_q, w_scale, linear.bias))


def test_replaced_weights_run_as_they_are_or_raise(tmp_path):
    _, loaded = loaded_mlp(tmp_path, QuantConfig())
    x = torch.randn(2, 64)
    float_weight = torch.randn(128, 64)
    loaded.up.weight = nn.Parameter(float_weight)  # a float weight runs as float
    torch.testing.assert_close(loaded.up(x), x @ float_weight.t() + loaded.up.bias)
    loaded.up.weight = nn.Parameter(float_weight.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(RuntimeError, match="StoredLinear's torch.float8_e4m3fn weight is not registered as stored"):
        loaded.up(x)


class OwnForwardLinear(nn.Linear):
    """A subclass of nn.Linear with a forward of its own, as Falcon's FalconLinear."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class OwnForwardBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = OwnForwardLinear(64, 128)

    def forward(self, x):
        return torch.relu(self.up(x))


def test_a_forward_of_its_own_runs_compiled_and_eagerly_says_it_cannot(caplog):
    torch.manual_seed(0)
    model, x = OwnForwardBlock().eval(), torch.randn(3, 64)
    config = QuantConfig(scheme="int8")
    with torch.no_grad():
        expected = torch.compile(model, backend=fxquant.backend(config))(x)  # the float model compiled: its weight quantized then
        fxquant.quantize_(model, config)
        assert isinstance(model.up, OwnForwardLinear) and model.up.weight.dtype == torch.int8
        assert "forward of their own" in caplog.text
        with pytest.raises(RuntimeError, match=r"layer 'up' \(OwnForwardLinear, a subclass of nn.Linear with a forward of its own\) "
                                               r"holds its weight as int8.*backend=\"fxquant\""):
            model(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, backend=fxquant.backend(config))(x), expected, rtol=0, atol=0)
        model.up.weight = nn.Parameter(torch.randn(128, 64))  # a float weight assigned since runs as float
        torch.testing.assert_close(model(x), torch.relu(x @ model.up.weight.T + model.up.bias))
