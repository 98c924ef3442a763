"""fxquant.export (fxquant/export.py): quantized ExportedPrograms, save/load, AOTInductor, on CPU.

The exported program must hold fxquant ops and low-precision buffers only (the rewritten layers'
float parameters gone from its signature and state dict), compute what the backend computes,
survive torch.export.save/load bit for bit, and compile with AOTInductor into a package that
still calls fxquant's ops (no silent fallback to float layers): whole on the CPU, lowered where
fxquant lowers them (CUDA: tests/kernels/test_cuda_export.py; here the CPU counted as such a device).
"""

import re
import zipfile

import pytest
import torch
from expecttest import TestCase

import fxquant
from fxquant import QuantConfig
from tests.graphs import aoti_package_calls, rewrite
from tests.inductor.test_decompositions import RMSNormLinear
from tests.models import MLP, relative_error, tiny_llama

CONFIGS = {
    "fp8_rowwise": QuantConfig(scheme="fp8_rowwise"),
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
        program = fxquant.export(MLP(), (torch.randn(2, 64),), config=CONFIGS["fp8_rowwise"])
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
    program = fxquant.export(MLP(), (x,), config=CONFIGS["fp8_rowwise"])
    torch.export.save(program, tmp_path / "mlp.pt2")
    loaded = fxquant.load_program(tmp_path / "mlp.pt2")
    assert loaded.state_dict.keys() == program.state_dict.keys()
    for name, tensor in program.state_dict.items():
        assert torch.equal(loaded.state_dict[name].view(torch.uint8), tensor.view(torch.uint8)), name
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), program.module()(x))


@pytest.mark.parametrize("dot_products", [True, False], ids=["vnni", "avx2"])
def test_aoti_package_lowers_int8_on_the_cpu_and_matches_the_program(tmp_path, monkeypatch, dot_products):
    """int8's decomposition applies on the CPU: the package runs Inductor's int8 GEMM (float32 matmuls
    where the compiling CPU has no int8 dot products), not the op whole."""
    from fxquant.ops import int8 as int8_ops

    monkeypatch.setattr(int8_ops, "cpu_int8_slow_reason", lambda: None if dot_products else "no VNNI")
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    program = fxquant.export(MLP(), (x,), config=QuantConfig(scheme="int8"))
    with torch._inductor.config.patch(force_disable_caches=True):  # the other CPU's package is the same program
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "mlp_aoti.pt2"))
    calls = aoti_package_calls(package)
    assert calls == [], f"the package calls fxquant's ops whole: {calls}"
    assert ("_int_mm" in package_source(package, "wrapper.cpp")) == dot_products
    runner = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), program.module()(x), rtol=1e-5, atol=1e-5)


def package_source(package: str, suffix: str) -> str:
    """The text of the package's one file whose name ends with `suffix` ("wrapper.cpp", "kernel.cpp")."""
    with zipfile.ZipFile(package) as archive:
        (name,) = [name for name in archive.namelist() if name.endswith(suffix)]
        return archive.read(name).decode()


@pytest.mark.parametrize("entry", ["fxquant", "torch"])
def test_fp8_package_on_the_cpu_calls_fxquants_ops_whole(tmp_path, entry):
    """On the CPU fxquant's decompositions decline: the package calls the linear ops themselves."""
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    program = fxquant.export(MLP(), (x,), config=CONFIGS["fp8_rowwise"])
    compile_package = fxquant.aoti_compile_and_package if entry == "fxquant" else torch._inductor.aoti_compile_and_package
    package = compile_package(program, package_path=str(tmp_path / "mlp.pt2"))
    assert aoti_package_calls(package) == ["fxquant::fp8_rowwise_linear"] * 2
    with torch.no_grad():
        torch.testing.assert_close(torch._inductor.aoti_load_package(package)(x), program.module()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.__version__ < "2.13", reason="torch 2.11's C++ backend does not emulate the bf16 rounding")
def test_package_fuses_the_quantization_where_fxquant_lowers(tmp_path, monkeypatch):
    """With the CPU counted as a device fxquant lowers on (as CUDA is), fxquant.aoti_compile_and_package
    makes one C++ kernel of the RMSNorm and the activation quantization, calls the GEMM op alone (on the
    CPU its reference), and computes what the program computes, bit for bit (fxquant's settings)."""
    from fxquant.inductor import install

    monkeypatch.setattr(install, "LOWERED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    torch.manual_seed(0)
    model, x = RMSNormLinear().to(torch.bfloat16), torch.randn(8, 256, dtype=torch.bfloat16)
    program = fxquant.export(model, (x,), config=CONFIGS["fp8_rowwise"])
    package = fxquant.aoti_compile_and_package(
        program, package_path=str(tmp_path / "rmsnorm.pt2"), inductor_configs={"force_disable_caches": True}
    )
    assert aoti_package_calls(package) == ["fxquant::fp8_rowwise_mm"]
    (kernel,) = package_source(package, "kernel.cpp").split('extern "C"')[1:]
    assert "std::sqrt" in kernel and "maximum" in kernel and "Float8_e4m3fn" in kernel, kernel
    with torch.no_grad():
        assert torch.equal(torch._inductor.aoti_load_package(package)(x), program.module()(x))


@pytest.mark.parametrize("lowered", [False, True], ids=["cpu", "lowered"])
def test_fxquant_aoti_applies_the_backends_settings_and_the_users_last(monkeypatch, lowered):
    """The settings the backend compiles a CUDA graph with (a decode-shaped one here: 8 tokens), its
    cache tag and its choices handler while compiling; the user's configs win. A program fxquant does
    not lower gets the user's configs alone, under fxquant's cache tag."""
    from torch._inductor.virtualized import V

    from fxquant.inductor import install
    from fxquant.inductor.choices import WholeRowReductions

    if lowered:
        monkeypatch.setattr(install, "LOWERED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    seen = []

    def aoti_compile_and_package(program, package_path, inductor_configs):
        seen.append((inductor_configs, type(V.choices), torch.compiler.config.cache_key_tag))
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", aoti_compile_and_package)
    program = fxquant.export(MLP(), (torch.randn(8, 64),), config=CONFIGS["fp8_rowwise"])
    assert fxquant.aoti_compile_and_package(program, "mlp.pt2", {"split_reductions": True}) == "mlp.pt2"
    (configs, choices, tag), = seen
    if lowered:
        assert configs["emulate_precision_casts"] is True and configs["split_reductions"] is True
        assert "inductor_choices_class" not in configs and choices is WholeRowReductions
        assert "|fxquant:" in tag and tag.endswith(f"|choices:{WholeRowReductions().uuid()}")
    else:
        # not lowered: the user's configs alone, but the tag still names fxquant's sources (its ops decompose on the CPU too)
        assert configs == {"split_reductions": True} and choices is not WholeRowReductions and "|fxquant:" in tag


def test_tiny_llama_exports_with_a_dynamic_sequence_length(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    tokens = torch.export.Dim("tokens", min=2, max=128)
    program = fxquant.export(model, (ids,), kwargs={"use_cache": False}, dynamic_shapes=({1: tokens}, None), config=CONFIGS["fp8_rowwise"])
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
