"""fxquant.export on models whose inputs and containers are named in every way torch.export allows.

Regression for issue 15 item 7: a `forward(input)` argument (nn.Sequential, a bare nn.Linear) broke
the program's signature, since copying the graph renamed the placeholder `input` → `input_1`. Each
program here must build, quantize every layer, equal the op run on the same weights (each nn.Linear
replaced by fxquant's op, by a forward hook: no export involved), and survive torch.export.save /
fxquant.load_program bit for bit.
"""

import pytest
import torch
from torch import nn

import fxquant
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from tests.models import relative_error

FP8 = fxquant.QuantConfig(scheme="fp8_rowwise")  # these programs are checked against the FP8 op (auto: int8 here)

DIM = 32


def linear(bias: bool = True) -> nn.Linear:
    return nn.Linear(DIM, DIM, bias=bias)


def module_with_argument(name: str) -> nn.Module:
    """A model whose forward's one argument is called `name`."""
    namespace = {}
    exec(f"def forward(self, {name}):\n    return self.fc2(torch.relu(self.fc1({name})))", {"torch": torch}, namespace)
    model_class = type(f"Argument_{name}", (nn.Module,), {"forward": namespace["forward"]})
    model = model_class()
    model.fc1, model.fc2 = linear(), linear(bias=False)
    return model


class ModuleListLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(linear() for _ in range(3))

    def forward(self, input):
        for layer in self.layers:
            input = torch.relu(layer(input))
        return input


class ModuleDictByKey(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"input": linear(), "weight": linear(bias=False)})

    def forward(self, input):
        return self.heads["weight"](self.heads["input"](input))


class StateNamedLikeFxquantBuffers(nn.Module):
    """A parameter and a buffer under the names fxquant's quantized buffers would take, and an
    argument named like their placeholders."""

    def __init__(self):
        super().__init__()
        self.fc = linear()
        self.register_buffer("fxquant_fc_weight", torch.full((DIM,), 2.0))
        self.fxquant_fc_scale = nn.Parameter(torch.full((DIM,), 0.5))

    def forward(self, b_fxquant_fc_weight):
        return self.fc(b_fxquant_fc_weight) * self.fxquant_fc_weight + self.fxquant_fc_scale


class VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = linear(), linear()

    def forward(self, *args):
        return self.fc1(args[0]) + self.fc2(args[1])


class VarKwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = linear(), linear()

    def forward(self, **kwargs):
        return self.fc1(kwargs["input"]) - self.fc2(kwargs["weight"])


class KeywordInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = linear(), linear(bias=False)

    def forward(self, input, weight=None, bias=None):
        return self.fc1(input) + self.fc2(weight) + bias


def x() -> torch.Tensor:
    return torch.randn(4, DIM)


ARGUMENT_NAMES = ["input", "x", "self_", "weight", "bias", "args_0", "b_fc1_bias", "p_fc1_weight",
                  "b_fxquant_fc1_weight", "fxquant_fc1_scale", "linear", "input_1", "print", "sum", "type"]

# name → (model, args, kwargs, number of linear layers)
CASES = {
    **{f"argument_{name}": (lambda name=name: (module_with_argument(name), (x(),), {}, 2)) for name in ARGUMENT_NAMES},
    "bare_linear": lambda: (linear(), (x(),), {}, 1),
    "sequential": lambda: (nn.Sequential(linear(), nn.ReLU(), linear(bias=False)), (x(),), {}, 2),
    "nested_sequential": lambda: (nn.Sequential(nn.Sequential(linear(), nn.GELU()), nn.Sequential(linear())), (x(),), {}, 2),
    "sequential_3d_input": lambda: (nn.Sequential(linear(), nn.Tanh(), linear()), (torch.randn(2, 3, DIM),), {}, 2),
    "module_list_loop": lambda: (ModuleListLoop(), (x(),), {}, 3),
    "module_dict": lambda: (ModuleDictByKey(), (x(),), {}, 2),
    "state_named_like_fxquant_buffers": lambda: (StateNamedLikeFxquantBuffers(), (x(),), {}, 1),
    "var_args": lambda: (VarArgs(), (x(), x()), {}, 2),
    "var_kwargs": lambda: (VarKwargs(), (), {"input": x(), "weight": x()}, 2),
    "keyword_inputs": lambda: (KeywordInputs(), (x(),), {"weight": x(), "bias": torch.randn(DIM)}, 2),
}


def op_reference(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """`model` run eagerly with each nn.Linear's output replaced by fxquant's op on its weight's quantized copy."""

    def quantized(layer, inputs, output):
        w_q, w_scale = quantize_fp8_rowwise(layer.weight.detach())
        return torch.ops.fxquant.fp8_rowwise_linear(inputs[0], w_q, w_scale, layer.bias, None)

    hooks = [m.register_forward_hook(quantized) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("case", list(CASES))
def test_program_runs_equals_the_op_reference_and_survives_save_and_load(case, tmp_path):
    torch.manual_seed(0)
    model, args, kwargs, n_linears = CASES[case]()
    model.eval()
    program = fxquant.export(model, args, kwargs, config=FP8)
    assert len(program.fxquant_plan.rewritten) == n_linears, str(program.fxquant_plan)
    assert program.graph_signature.user_inputs == torch.export.export(model, args, kwargs).graph_signature.user_inputs
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fxquant.fp8_rowwise_linear.default) == n_linears

    expected = op_reference(model, args, kwargs)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*args, **kwargs), expected, rtol=0, atol=0)
        assert 0 < relative_error(expected, model(*args, **kwargs)) < 0.1

    torch.export.save(program, tmp_path / "program.pt2")
    loaded = fxquant.load_program(tmp_path / "program.pt2")
    assert [spec.arg.name for spec in loaded.graph_signature.input_specs] == [
        spec.arg.name for spec in program.graph_signature.input_specs
    ]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(*args, **kwargs), expected, rtol=0, atol=0)


def test_model_state_named_like_fxquant_buffers_is_kept_beside_them():
    torch.manual_seed(0)
    model = StateNamedLikeFxquantBuffers().eval()
    program = fxquant.export(model, (x(),), config=FP8)
    assert torch.equal(program.state_dict["fxquant_fc_weight"], model.fxquant_fc_weight)
    assert torch.equal(program.state_dict["fxquant_fc_scale"], model.fxquant_fc_scale.detach())
    lifted = program.fxquant_plan.rewritten[0].quantized
    assert program.state_dict[lifted.attrs["weight"]].dtype == torch.float8_e4m3fn
    assert program.state_dict[lifted.attrs["weight_scale"]].shape == (DIM,)


def test_a_program_of_a_model_with_input_arguments_is_checkpointed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(linear(), nn.ReLU(), linear()).eval()
    program = fxquant.export(model, (x(),), config=FP8)
    fxquant.save_quantized(program, tmp_path / "out")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "out" / "model.safetensors")
    w_q, w_scale = quantize_fp8_rowwise(model[0].weight.detach())
    assert torch.equal(tensors["0.weight"].view(torch.uint8), w_q.view(torch.uint8))
    assert torch.equal(tensors["0.weight_scale"].flatten(), w_scale)
