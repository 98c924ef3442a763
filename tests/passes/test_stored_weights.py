"""Layers loaded already quantized (passes/stored_weights.py): the backend and export use the
stored weight and scale as they are, and compute exactly what quantizing the float model gives."""

import pytest
import torch
from expecttest import TestCase

import fxquant
from fxquant import QuantConfig
from fxquant import SCHEMES
from fxquant.passes.stored_weights import STORED_WEIGHTS, register_stored_weight
from tests.graphs import rewrite
from tests.models import MLP

# How a checkpoint stores each scheme's scale: HF fbgemm_fp8 keeps per-channel scales as [N, 1].
STORED_SCALE_SHAPE = {
    "fp8_rowwise": lambda scale: scale.view(-1, 1),
    "fp8_blockwise": lambda scale: scale,
    "fp8_tensorwise": lambda scale: scale.view(1),
    "int8": lambda scale: scale,
}
CONFIGS = {
    "fp8_rowwise": QuantConfig(scheme="fp8_rowwise"),
    "fp8_blockwise": QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32)),
    "fp8_tensorwise": QuantConfig(scheme="fp8_tensorwise"),
    "int8": QuantConfig(scheme="int8"),
}


def stored_copy(model: MLP, config: QuantConfig) -> MLP:
    """`model` with up and down stored quantized, as a loaded checkpoint holds them."""
    stored = MLP()
    stored.load_state_dict(model.state_dict())
    for linear in (stored.up, stored.down):
        tensors = SCHEMES[config.scheme].quantize(linear.weight.detach(), config.options_for(config.scheme))
        w_q, w_scale = tensors["weight"], tensors["weight_scale"]
        linear.weight = torch.nn.Parameter(w_q, requires_grad=False)
        linear.register_buffer("weight_scale", STORED_SCALE_SHAPE[config.scheme](w_scale))
        register_stored_weight(linear, config.scheme)
    return stored


@pytest.mark.parametrize("scheme", list(CONFIGS))
def test_stored_weights_compute_what_quantizing_the_float_model_gives(scheme):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    stored = stored_copy(model, CONFIGS[scheme])
    backend = fxquant.backend(CONFIGS[scheme], keep_graphs=True)
    with torch.no_grad():
        expected = torch.compile(model, backend=fxquant.backend(CONFIGS[scheme]))(x)
        torch._dynamo.reset()
        actual = torch.compile(stored, backend=backend)(x)
    assert torch.equal(actual, expected)
    (plan,) = backend.plans
    assert [(e.layer, e.scheme, e.note) for e in plan.rewritten] == [
        ("up", scheme, "stored quantized weights"), ("down", scheme, "stored quantized weights")
    ]
    assert not hasattr(backend.graphs[0], "fxquant_up_weight"), "stored weights must not be quantized again"


class StoredMatmul(torch.nn.Module):
    """A stored int8 weight used as `x @ W.t()`: the transpose must not reach the op."""

    def __init__(self, w_q, w_scale):
        super().__init__()
        self.w = torch.nn.Parameter(w_q, requires_grad=False)
        self.register_buffer("w_scale", w_scale)
        register_stored_weight(self, "int8", "w")

    def forward(self, x):
        return x @ self.w.t()


def test_stored_weight_in_a_matmul_with_transpose():
    torch.manual_seed(0)
    weight, x = torch.randn(48, 64), torch.randn(4, 64)
    w_q, w_scale = SCHEMES["int8"].quantize(weight, None).values()
    with torch.no_grad():
        out = torch.compile(StoredMatmul(w_q, w_scale), backend="fxquant")(x)
    torch.testing.assert_close(out, torch.ops.fxquant.int8_linear(x, w_q, w_scale, None))


def test_plan_of_a_model_with_stored_weights():
    plan = fxquant.plan(stored_copy(MLP(), QuantConfig(scheme="int8")), torch.randn(2, 64))
    assert [(e.layer, e.scheme, e.note) for e in plan] == [
        ("up", "int8", "stored quantized weights"),
        ("down", "int8", "stored quantized weights"),
        ("lm_head", None, "skipped by skip list (lm_head)"),
    ]


def test_stored_weight_without_a_scale_is_an_error_naming_the_layer():
    stored = stored_copy(MLP(), CONFIGS["fp8_rowwise"])
    del stored.down.weight_scale, STORED_WEIGHTS[stored.down.weight]
    with pytest.raises(Exception, match="layer 'down': stored torch.float8_e4m3fn weight without a float32 down.weight_scale"):
        torch.compile(stored, backend="fxquant")(torch.randn(2, 64))


def test_export_keeps_stored_weights_as_they_are():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 64)
    stored = stored_copy(model, CONFIGS["fp8_rowwise"])
    program = fxquant.export(stored, (x,))
    assert program.state_dict["up.weight"].dtype == torch.float8_e4m3fn
    assert not any(name.startswith("fxquant_") for name in program.state_dict)
    with torch.no_grad():
        assert torch.equal(program.module()(x), fxquant.export(model, (x,), config=CONFIGS["fp8_rowwise"]).module()(x))


class StoredGraphTest(TestCase):
    def test_golden_graph_reads_the_stored_tensors(self):
        code, _, _ = rewrite(stored_copy(MLP(), CONFIGS["fp8_rowwise"]), torch.randn(2, 64))
        self.assertExpectedInline(code, """\
def forward(self, up_weight_, up_bias_, L_x_, down_weight_, lm_head_weight_):
    fxquant_up_stored_scale = self.fxquant_up_stored_scale
    fp8_rowwise_linear_default = torch.ops.fxquant.fp8_rowwise_linear.default(l_x_, up_weight_, fxquant_up_stored_scale, up_bias_, None)
    gelu = torch._C._nn.gelu(fp8_rowwise_linear_default)
    fxquant_down_stored_scale = self.fxquant_down_stored_scale
    fp8_rowwise_linear_default_1 = torch.ops.fxquant.fp8_rowwise_linear.default(gelu, down_weight_, fxquant_down_stored_scale, None, None)
    linear_2 = torch._C._nn.linear(fp8_rowwise_linear_default_1, lm_head_weight_, None)
    return (linear_2,)""")
