"""scheme="auto", the default (fxquant/config.py): fp8_rowwise on GPUs with FP8 tensor cores, int8 on
older GPUs and on CPUs with int8 dot products (unquantized on other CPUs), fp8_rowwise in checkpoints;
the plan notes the choice and checkpoints record the concrete scheme."""

import json

import pytest
import torch

import fxquant
from fxquant import QuantConfig
from fxquant import config as config_module
from fxquant.ops import availability
from tests.models import tiny_llama

CUDA = torch.device("cuda", 0)


def on_gpu(monkeypatch, capability):
    """Pretend the CUDA device has `capability`."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    config_module.fp8_unsupported_reason.cache_clear()
    monkeypatch.setattr(config_module, "fp8_unsupported_reason", config_module.fp8_unsupported_reason.__wrapped__)


@pytest.mark.parametrize("capability, scheme, why", [
    ((9, 0), "fp8_rowwise", "sm_90 has FP8 tensor cores"),
    ((8, 9), "fp8_rowwise", "sm_89 has FP8 tensor cores"),
    ((8, 0), "int8", r"Some GPU \(sm_80\) has no FP8 tensor cores"),
])
def test_auto_on_a_gpu_is_fp8_from_sm89_and_int8_before(monkeypatch, capability, scheme, why):
    on_gpu(monkeypatch, capability)
    decision = QuantConfig().decide("layers.0.q_proj", CUDA)
    assert decision.scheme == scheme
    assert decision.note.startswith(f"auto -> {scheme}: ")
    assert pytest.importorskip("re").search(why, decision.note)


def test_auto_is_int8_on_the_cpu_and_fp8_rowwise_for_a_checkpoint():
    assert QuantConfig().decide("fc", torch.device("cpu")).scheme == "int8"
    checkpoint = QuantConfig().decide("fc")
    assert checkpoint.scheme == "fp8_rowwise" and "device-independent" in checkpoint.note
    assert QuantConfig().decide("lm_head", torch.device("cpu")) == (None, "skip", "lm_head", None)
    assert QuantConfig(scheme="int8").decide("fc").note == ""  # a scheme given by name has no note


def test_auto_in_rules_and_the_options_of_what_it_may_choose():
    config = QuantConfig(scheme="int8", rules={"*.q_proj": "auto"}, activation_scale_ub=1200.0)
    assert config.schemes_in_use() == ("int8", "fp8_rowwise")
    decision = config.decide("layers.0.q_proj", torch.device("cpu"))
    assert decision.scheme == "int8" and decision.note.startswith("rule '*.q_proj'; auto -> int8: ")
    assert config.options_for("fp8_rowwise").activation_scale_ub == 1200.0
    assert QuantConfig(activation_scale_ub=8.0).activation_scale_ub == 8.0  # auto may choose FP8
    resolved = config.resolved()
    assert resolved.rules == (("*.q_proj", "fp8_rowwise"),) and resolved.scheme == "int8"
    assert QuantConfig().resolved(torch.device("cpu")).scheme == "int8"


def test_the_compiled_plan_shows_int8_on_the_cpu_and_why():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    plan = fxquant.plan(model, torch.randn(3, 32))
    assert [row.scheme for row in plan] == ["int8", "int8"]
    assert all(row.note == "auto -> int8: " + config_module.auto_scheme(torch.device("cpu"))[1] for row in plan)


def test_a_config_passed_to_plan_as_an_input_is_refused_by_name():
    model = torch.nn.Linear(32, 16)
    with pytest.raises(TypeError, match=r"pass the QuantConfig by name, fxquant.plan\(model, \*inputs, config=...\)"):
        fxquant.plan(model, torch.randn(3, 32), QuantConfig(scheme="int8"))


def test_a_checkpoint_records_the_concrete_scheme_never_auto(tmp_path):
    fxquant.save_quantized(tiny_llama(), tmp_path / "ckpt")
    metadata = json.loads((tmp_path / "ckpt" / "fxquant.json").read_text())
    assert metadata["config"]["scheme"] == "fp8_rowwise"
    schemes = {row["scheme"] for row in metadata["plan"]}
    assert schemes == {"fp8_rowwise", None}
    assert "auto" not in json.dumps(metadata["config"])


def test_quantize_in_place_then_save_agree_on_auto(tmp_path):
    """quantize_ makes what load_quantized makes, so auto means what it means in checkpoints."""
    model = tiny_llama()
    plan = fxquant.quantize_(model)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    assert all(e.note.startswith("auto -> fp8_rowwise") for e in plan.rewritten)
    fxquant.save_quantized(model, tmp_path / "ckpt")  # the stored layers agree with the resolved config


def test_expert_weights_under_auto_on_the_cpu_stay_as_they_are_with_the_reason():
    """int8 has no expert form: on the CPU auto leaves expert weights in float (faster there than FP8's
    reference experts), and the plan says why."""
    from tests.passes.test_expert_sites import BF16, OFFSETS, K, S, GroupedExperts

    plan = fxquant.plan(GroupedExperts().to(BF16), torch.randn(S, K, dtype=BF16), OFFSETS)
    (row,) = list(plan)
    assert row.scheme is None and row.note == "int8 has no grouped form for expert weights"


def on_cpu(monkeypatch, **capabilities):
    """Pretend this CPU has exactly `capabilities` (cpuinfo's names: avx512_vnni=True, ...)."""
    monkeypatch.setattr(availability, "cpu_capabilities", lambda: {"cpu_name": "Some CPU", "avx2": True, **capabilities})
    availability.cpu_int8_slow_reason.cache_clear()
    monkeypatch.setattr(config_module, "cpu_int8_slow_reason", availability.cpu_int8_slow_reason.__wrapped__)


@pytest.mark.parametrize("instruction", availability.CPU_INT8_DOT_PRODUCTS)
def test_auto_is_int8_on_a_cpu_with_int8_dot_products(monkeypatch, instruction):
    on_cpu(monkeypatch, **{instruction: True})
    decision = QuantConfig().decide("fc", torch.device("cpu"))
    assert decision.scheme == "int8" and decision.note == "auto -> int8: no FP8 GEMMs on cpu"


def test_auto_leaves_layers_unquantized_on_a_cpu_without_int8_dot_products(monkeypatch):
    """On such a CPU aten._int_mm runs a reference loop (41x slower than the fp32 matmul on an AVX2
    EPYC): auto compiles the float model, and the plan says why."""
    on_cpu(monkeypatch, avx512_vnni=False)
    why = "Some CPU has no int8 dot-product instructions (avx512_vnni, avx_vnni, amx_int8): int8 GEMMs run slower than float there"
    assert QuantConfig().decide("fc", torch.device("cpu")) == (None, "scheme", None, why)
    assert QuantConfig().decide("fc", torch.device("cpu")).note == f"auto -> unquantized: {why}"
    assert QuantConfig().decide("fc").scheme == "fp8_rowwise"  # a checkpoint's choice does not depend on the CPU
    assert QuantConfig(scheme="int8").decide("fc", torch.device("cpu")).scheme == "int8"  # named: as asked

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(3, 32)
    plan = fxquant.plan(model, x)
    assert [(row.scheme, row.note) for row in plan] == [(None, f"auto -> unquantized: {why}")] * 2
    compiler = fxquant.backend(QuantConfig(), keep_graphs=True)
    with torch.no_grad():
        out = torch.compile(model, backend=compiler)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)  # the float graph, compiled by Inductor
    assert not [n for n in compiler.graphs[0].graph.nodes if "fxquant" in str(n.target)]


def test_a_program_exported_where_auto_left_layers_unquantized_saves_and_loads(monkeypatch, tmp_path):
    on_cpu(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(3, 32)
    fxquant.save_quantized(fxquant.export(model, (x,)), tmp_path / "ckpt")
    metadata = json.loads((tmp_path / "ckpt" / "fxquant.json").read_text())
    assert metadata["config"]["rules"][-1] == ["*", None] and metadata["config"]["scheme"] == "fp8_rowwise"
    assert {row["scheme"] for row in metadata["plan"]} == {None}
    loaded = fxquant.load_quantized(tmp_path / "ckpt", torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval())
    assert torch.equal(loaded(x), model(x))
