"""Quantized layers follow eager's dtype rules (issue 15 item 11).

Outside autocast, an activation, weight or bias of another dtype is an error naming the layer at
compile time (eager nn.Linear raises too), never a silent result in the activation's dtype. Under
`torch.autocast` the ops cast the activation and bias as aten::linear's autocast rule does
(fxquant/ops/autocast.py), in the eager op, in compiled graphs (AOTAutograd traces the casts) and
in exported programs; regions with autocast disabled keep eager's float32.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters

import fxquant
from fxquant import QuantConfig
from fxquant import SCHEMES
from tests.graphs import rewrite
from tests.models import MLP, Addmm, FunctionalLinear, MatmulOnWeight, relative_error

ALL_LAYERS = {"skip": [], "scheme": "fp8_rowwise"}  # the FP8 op's dtype rules (auto is int8 on the CPU)
# Quantization error against the float model, with bf16 rounding on top under autocast.
BOUND = 0.08

# name → (model, its first quantized layer)
MODELS = {
    "mlp": (MLP, "up"),
    "functional_linear": (FunctionalLinear, "w1"),
    "matmul_on_weight": (MatmulOnWeight, "w"),
    "addmm": (Addmm, "weight"),
}


class MixedBias(nn.Module):
    """An fp32 layer whose bias was left in bf16 (a half-converted checkpoint)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64) / 8)
        self.bias = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class AutocastRegions(nn.Module):
    """`first` under a bf16 autocast region of its own, `second` in a region that turns autocast off."""

    def __init__(self, cast_back: bool = True):
        super().__init__()
        self.first, self.second = nn.Linear(64, 64), nn.Linear(64, 32)
        self.cast_back = cast_back

    def forward(self, x):
        with torch.autocast("cpu", torch.bfloat16):
            hidden = self.first(x)
            with torch.autocast("cpu", enabled=False):
                return self.second(hidden.float() if self.cast_back else hidden)


def eager_error(model: nn.Module, x: torch.Tensor) -> str:
    with pytest.raises(RuntimeError, match="same dtype") as raised:
        model(x)
    return str(raised.value)


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_model_given_a_half_input_raises_naming_the_layer(name, input_dtype):
    model_class, layer = MODELS[name]
    model, x = model_class().eval(), torch.randn(4, 64, dtype=input_dtype)
    eager_error(model, x)
    compiled = torch.compile(model, backend="fxquant", options=ALL_LAYERS)
    dtype = str(input_dtype).removeprefix("torch.")
    with pytest.raises(BackendCompilerFailed, match=rf"fxquant: layer '{layer}': activation {dtype}, weight float32.*same dtype"):
        compiled(x)


@pytest.mark.parametrize("model_dtype, input_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_half_model_given_another_input_dtype_raises(model_dtype, input_dtype):
    model, x = MLP().eval().to(model_dtype), torch.randn(4, 64, dtype=input_dtype)
    eager_error(model, x)
    with pytest.raises(BackendCompilerFailed, match="fxquant: layer 'up': activation .* weight .* bias"):
        torch.compile(model, backend="fxquant", options=ALL_LAYERS)(x)


def test_bias_of_another_dtype_raises():
    model, x = MixedBias().eval(), torch.randn(4, 64)
    eager_error(model, x)
    with pytest.raises(BackendCompilerFailed, match="fxquant: layer 'weight': activation float32, weight float32, bias bfloat16"):
        torch.compile(model, backend="fxquant", options=ALL_LAYERS)(x)


def test_matching_dtypes_in_half_precision_still_quantize():
    torch.manual_seed(0)
    model, x = MLP().eval().to(torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
    _, output, plan = rewrite(model, x, config=QuantConfig(skip=[]))
    assert len(plan.rewritten) == 3 and output.dtype == torch.bfloat16
    with torch.no_grad():
        assert relative_error(output, model(x)) < BOUND


def test_a_region_turning_autocast_off_applies_eager_rules_inside_it():
    """A bf16 activation into an fp32 layer inside `autocast(enabled=False)` raises in eager, and so here."""
    model, x = AutocastRegions(cast_back=False).eval(), torch.randn(4, 64)
    eager_error(model, x)
    with pytest.raises(BackendCompilerFailed, match="fxquant: layer 'second': activation bfloat16, weight float32"):
        torch.compile(model, backend="fxquant", options=ALL_LAYERS)(x)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_eager_op_under_autocast_is_the_op_on_cast_activation_and_bias(scheme, autocast_dtype):
    torch.manual_seed(0)
    config = QuantConfig(scheme=scheme, weight_block_size=(32, 32),
                         static_activation_amax={"fc": 4.0} if scheme == "fp8_tensorwise" else None)
    x, weight, bias = torch.randn(5, 64), torch.randn(32, 64), torch.randn(32)
    options = config.options_for(scheme)
    tensors = SCHEMES[scheme].quantize(weight, options)

    def call(x, bias):
        call = SCHEMES[scheme].call("fc", x, tensors, bias, options, values=tensors)
        return call.op(*call.node_args())

    expected = call(x.to(autocast_dtype), bias.to(autocast_dtype))
    with torch.autocast("cpu", autocast_dtype):
        actual = call(x, bias)
        with torch.autocast("cpu", enabled=False):
            assert call(x, bias).dtype == torch.float32
    assert actual.dtype == autocast_dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_compiled_fp32_model_under_autocast_returns_eager_autocasts_dtype(autocast_dtype):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 64)
    with torch.no_grad(), torch.autocast("cpu", autocast_dtype):
        expected = model(x)
        actual = torch.compile(model, backend="fxquant", options=ALL_LAYERS)(x)
    assert counters["fxquant"]["fp8_rowwise_linear"] == 3
    assert actual.dtype == expected.dtype == autocast_dtype
    assert relative_error(actual, expected) < BOUND


def test_compiled_regions_that_turn_autocast_on_and_off_match_eager():
    torch.manual_seed(0)
    model, x = AutocastRegions().eval(), torch.randn(4, 64)
    backend = fxquant.Backend(QuantConfig(skip=[]))
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, backend=backend)(x)
        hidden = torch.compile(model.first, backend="fxquant")
        with torch.autocast("cpu", torch.bfloat16):
            hidden_expected, hidden_actual = model.first(x), hidden(x)
    assert [entry.layer for entry in backend.plans[0].rewritten] == ["first", "second"]
    assert actual.dtype == expected.dtype == torch.float32
    assert relative_error(actual, expected) < BOUND
    assert hidden_actual.dtype == hidden_expected.dtype == torch.bfloat16
    assert relative_error(hidden_actual, hidden_expected) < BOUND


@pytest.mark.parametrize("export_under_autocast", [False, True])
def test_exported_program_follows_its_runners_autocast(export_under_autocast):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 64)
    with torch.autocast("cpu", torch.bfloat16, enabled=export_under_autocast):
        program = fxquant.export(model, (x,), config=QuantConfig(skip=[]))
    assert len(program.fxquant_plan.rewritten) == 3
    module = program.module()
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            expected, actual = model(x), module(x)
        assert module(x).dtype == torch.float32
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert relative_error(actual, expected) < BOUND
