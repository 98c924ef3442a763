"""fxquant.export (fxquant/export.py): quantized ExportedPrograms, save/load, AOTInductor, on CPU.

The exported program must hold fxquant ops and low-precision buffers only (the rewritten layers'
float parameters gone from its signature and state dict), compute what the backend computes,
survive torch.export.save/load bit for bit, and compile with AOTInductor into a package that
still calls fxquant's ops (no silent fallback to float layers).
"""

import re

import pytest
import torch
from expecttest import TestCase

import fxquant
from fxquant import QuantConfig
from tests.graphs import aoti_package_calls, rewrite
from tests.models import MLP, relative_error, tiny_llama

CONFIGS = {
    "fp8_rowwise": QuantConfig(),
    "fp8_blockwise": QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32)),
    "fp8_tensorwise": QuantConfig(scheme="fp8_tensorwise"),
    "fp8_tensorwise_static": QuantConfig(scheme="fp8_tensorwise", static_activation_amax={"up": 4.0, "down": 2.0}),
    "int8": QuantConfig(scheme="int8"),
}


def program_code(program) -> str:
    code = re.sub(r";\s+(\w+ = )+None", "", program.graph_module.code.strip())
    return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class ExportGraphTest(TestCase):
    def test_exported_mlp_graph_and_signature(self):
        torch.manual_seed(0)
        program = fxquant.export(MLP(), (torch.randn(2, 64),))
        self.assertExpectedInline(program_code(program), """\
def forward(self, p_up_bias, p_lm_head_weight, b_fxquant_up_weight, b_fxquant_up_scale, b_fxquant_down_weight, b_fxquant_down_scale, x):
    fp8_rowwise_linear_default = torch.ops.fxquant.fp8_rowwise_linear.default(x, b_fxquant_up_weight, b_fxquant_up_scale, p_up_bias, None)
    gelu = torch.ops.aten.gelu.default(fp8_rowwise_linear_default)
    fp8_rowwise_linear_default_1 = torch.ops.fxquant.fp8_rowwise_linear.default(gelu, b_fxquant_down_weight, b_fxquant_down_scale, None, None)
    linear_2 = torch.ops.aten.linear.default(fp8_rowwise_linear_default_1, p_lm_head_weight)
    return (linear_2,)""")
        self.assertExpectedInline(str(program.graph_signature).strip(), """\
# inputs
p_up_bias: PARAMETER target='up.bias'
p_lm_head_weight: PARAMETER target='lm_head.weight'
b_fxquant_up_weight: BUFFER target='fxquant_up_weight' persistent=True
b_fxquant_up_scale: BUFFER target='fxquant_up_scale' persistent=True
b_fxquant_down_weight: BUFFER target='fxquant_down_weight' persistent=True
b_fxquant_down_scale: BUFFER target='fxquant_down_scale' persistent=True
x: USER_INPUT

# outputs
linear_2: USER_OUTPUT""")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_program_matches_the_backend_graph_and_drops_float_weights(name):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(3, 64)
    program = fxquant.export(model, (x,), config=CONFIGS[name])
    assert [entry.layer for entry in program.fxquant_plan.rewritten] == ["up", "down"]
    assert "up.weight" not in program.state_dict and "down.weight" not in program.state_dict
    assert "lm_head.weight" in program.state_dict and "up.bias" in program.state_dict
    low_precision = {program.state_dict["fxquant_up_weight"].dtype, program.state_dict["fxquant_down_weight"].dtype}
    assert low_precision <= {torch.float8_e4m3fn, torch.int8}
    assert state_bytes(program.state_dict) < state_bytes(model.state_dict()) / 2

    _, backend_output, _ = rewrite(model, x, config=CONFIGS[name])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), backend_output, rtol=1e-6, atol=1e-6)
        assert 0 < relative_error(program.module()(x), model(x)) < 0.1


def test_save_and_load_round_trip_bit_exactly(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    program = fxquant.export(MLP(), (x,))
    torch.export.save(program, tmp_path / "mlp.pt2")
    loaded = fxquant.load_program(tmp_path / "mlp.pt2")
    assert loaded.state_dict.keys() == program.state_dict.keys()
    for name, tensor in program.state_dict.items():
        assert torch.equal(loaded.state_dict[name].view(torch.uint8), tensor.view(torch.uint8)), name
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), program.module()(x))


def test_aoti_package_calls_fxquant_ops_and_matches_the_program(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    program = fxquant.export(MLP(), (x,), config=QuantConfig(scheme="int8"))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "mlp_aoti.pt2"))
    calls = aoti_package_calls(package)
    assert calls == ["fxquant::int8_linear", "fxquant::int8_linear"], f"the package does not call fxquant's ops: {calls}"
    runner = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), program.module()(x), rtol=1e-5, atol=1e-5)


def test_tiny_llama_exports_with_a_dynamic_sequence_length(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    tokens = torch.export.Dim("tokens", min=2, max=128)
    program = fxquant.export(model, (ids,), kwargs={"use_cache": False}, dynamic_shapes=({1: tokens}, None))
    assert len(program.fxquant_plan.rewritten) == 14
    assert [entry.layer for entry in program.fxquant_plan.skipped] == ["lm_head"]
    torch.export.save(program, tmp_path / "llama.pt2")
    loaded = fxquant.load_program(tmp_path / "llama.pt2").module()
    with torch.no_grad():
        for length in (16, 37):
            ids = torch.randint(0, 128, (2, length))
            error = relative_error(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
            assert 0 < error < 0.08, f"length {length}: logits relative error {error:.4f}"


def test_a_layer_whose_output_the_model_returns_exports_and_round_trips(tmp_path):
    """The rewritten op replaces the graph's output node: the program's output spec follows it.
    (A bare nn.Linear would do, but torch.export cannot load back a program whose input is named
    `input`, fxquant or not, on torch 2.13.)"""

    class Projection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model, x = Projection(), torch.randn(4, 64)
    program = fxquant.export(model, (x,), config=QuantConfig(scheme="int8"))
    assert [spec.arg.name for spec in program.graph_signature.output_specs] == ["int8_linear_default"]
    torch.export.save(program, tmp_path / "linear.pt2")
    loaded = fxquant.load_program(tmp_path / "linear.pt2")
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), program.module()(x))
        assert 0 < relative_error(program.module()(x), model(x)) < 0.02
