"""Export, AOTInductor and checkpoints on CUDA (gpu marker): the package runs fxquant's CUDA ops and
matches the exported program; stored FP8 weights, registered by hand or loaded from a checkpoint
onto the GPU, run as they are."""

import functools
import json
import subprocess
import sys

import pytest
import torch

import fxquant
from fxquant import QuantConfig
from tests.graphs import aoti_package_calls
from tests.models import MLP, relative_error

pytestmark = pytest.mark.gpu

# How a package is made and run: its weights inside the .so (the default) or handed to the loaded
# runner with `load_constants` (which skips the loader's own constant path), and loaded in the
# process that compiled it or in a fresh one.
AOTI_VARIANTS = {
    "constants in the .so": ({}, "same process"),
    "constants loaded after": ({"aot_inductor.package_constants_in_so": False}, "same process"),
    "loaded in a fresh process": ({}, "fresh process"),
}

# argv: package path, the inputs' .pt file, the outputs' .pt file, state .pt file or "" (then
# the constants are in the package). Used for fxquant's package and for the plain probe alike.
RUN_PACKAGE = """
import sys, torch
import fxquant  # registers fxquant's ops, which the package calls
package, inputs, outputs, state = sys.argv[1:5]
runner = torch._inductor.aoti_load_package(package)
if state:
    runner.load_constants(torch.load(state), check_full_update=True)
with torch.no_grad():
    torch.save(runner(*torch.load(inputs)), outputs)
"""

PLAIN_PACKAGE = """
import json, os, sys, torch
configs, directory = json.loads(sys.argv[1]), sys.argv[2]
model = torch.nn.Linear(64, 64).cuda()
x = torch.randn(4, 64, device="cuda")
program = torch.export.export(model, (x,))
torch._inductor.aoti_compile_and_package(
    program, package_path=os.path.join(directory, "plain.pt2"), inductor_configs=dict(configs))
torch.save((x,), os.path.join(directory, "inputs.pt"))
torch.save(program.state_dict, os.path.join(directory, "state.pt"))
"""


def run_package(package: str, inputs: tuple, directory, state: dict | None = None) -> tuple[int, object]:
    """Load and run an AOTInductor package in a fresh process: (exit code, its output or None)."""
    torch.save(inputs, directory / "inputs.pt")
    if state is not None:
        torch.save(state, directory / "state.pt")
    result = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", RUN_PACKAGE, package, str(directory / "inputs.pt"),
         str(directory / "outputs.pt"), str(directory / "state.pt") if state is not None else ""],
        capture_output=True, text=True, timeout=600,
    )
    return result.returncode, torch.load(directory / "outputs.pt") if result.returncode == 0 else None


@functools.cache
def aoti_variant_on_cuda() -> tuple[str | None, str]:
    """The first variant with which this torch runs a plain nn.Linear package on CUDA (None if
    none does), and what each variant did. Everything runs in subprocesses: torch 2.11.0+cu130 on
    the lent H100 segfaults inside aoti_load_package (in `_load_aoti`) for the default variant,
    with or without fxquant."""
    import pathlib
    import tempfile

    outcomes = []
    for name, (configs, where) in AOTI_VARIANTS.items():
        directory = pathlib.Path(tempfile.mkdtemp())
        if where == "same process":
            code = _run_in_compile_process(directory, configs)
        else:
            code = subprocess.run(
                [sys.executable, "-c", PLAIN_PACKAGE, json.dumps(configs), str(directory)], capture_output=True, timeout=600
            ).returncode
            if code == 0:
                state = torch.load(directory / "state.pt") if configs else None
                code = run_package(str(directory / "plain.pt2"), torch.load(directory / "inputs.pt"), directory, state)[0]
        if code == 0:
            return name, "; ".join([*outcomes, f"{name}: runs"])
        outcomes.append(f"{name}: exit {code}")
    return None, "; ".join(outcomes)


def _run_in_compile_process(directory, configs: dict) -> int:
    """The probe's same-process variant: compile and load in one (sub)process, as the test does."""
    script = PLAIN_PACKAGE + """
runner = torch._inductor.aoti_load_package(os.path.join(directory, "plain.pt2"))
if configs:
    runner.load_constants(program.state_dict, check_full_update=True)
runner(x)
"""
    return subprocess.run(
        [sys.executable, "-c", script, json.dumps(configs), str(directory)], capture_output=True, text=True, timeout=600
    ).returncode


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8"])
def test_aoti_package_on_cuda(tmp_path, scheme):
    variant, outcomes = aoti_variant_on_cuda()
    if variant is None:
        pytest.skip(f"AOTInductor cannot run a plain nn.Linear package on CUDA with torch {torch.__version__} ({outcomes})")
    print(f"AOTInductor on CUDA: {outcomes}")
    torch.manual_seed(0)
    model = MLP(dim=256, hidden=512).cuda().to(torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    program = fxquant.export(model, (x,), config=QuantConfig(scheme=scheme))
    configs, where = AOTI_VARIANTS[variant]
    # a copy: aoti_compile_and_package adds its own keys to the dict it is given
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "mlp.pt2"), inductor_configs=dict(configs))
    calls = aoti_package_calls(package)
    assert calls == [f"fxquant::{scheme}_linear"] * 2, f"the package does not call fxquant's ops: {calls}"
    state = {**program.state_dict, **program.constants} if configs else None
    if where == "fresh process":
        code, actual = run_package(package, (x,), tmp_path, state)
        assert code == 0, f"fxquant's package exits {code} where a plain one runs"
    else:
        runner = torch._inductor.aoti_load_package(package)
        if state is not None:
            runner.load_constants(state, check_full_update=True)
        with torch.no_grad():
            actual = runner(x)
    with torch.no_grad():
        expected = program.module()(x)
        assert relative_error(actual, expected) < 1e-2
        assert 0 < relative_error(expected, model(x)) < 0.08


def test_stored_fp8_weights_on_cuda():
    from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
    from fxquant.passes.stored_weights import register_stored_weight

    torch.manual_seed(0)
    model = MLP(dim=256, hidden=512).cuda().to(torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = torch.compile(model, backend="fxquant")(x)
    torch._dynamo.reset()
    for linear in (model.up, model.down):
        w_q, w_scale = quantize_fp8_rowwise(linear.weight.detach())
        linear.weight = torch.nn.Parameter(w_q, requires_grad=False)
        linear.register_buffer("weight_scale", w_scale.view(-1, 1))
        register_stored_weight(linear)
    with torch.no_grad():
        actual = torch.compile(model, backend="fxquant")(x)
    assert relative_error(actual, expected) < 1e-3


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8"])
def test_checkpoint_loads_onto_the_gpu_and_compiles(tmp_path, scheme):
    """A tiny Llama checkpoint loaded with device="cuda" into a model made under empty_weights():
    the stored tensors land on the GPU as they are, and the compiled model computes what compiling
    the float model gives (same weights, same quantization)."""
    from transformers import LlamaForCausalLM

    from tests.models import tiny_llama_config

    # Built the way HF builds a bf16 model (and the loaded one below): rotary frequencies stay fp32.
    # `.to(torch.bfloat16)` would round them, and they are no checkpoint's business (non-persistent).
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_llama_config(), dtype=torch.bfloat16).eval()
    config = QuantConfig(scheme=scheme)
    fxquant.save_quantized(model, tmp_path, config)
    with fxquant.empty_weights():
        loaded = LlamaForCausalLM(model.config)
    fxquant.load_quantized(tmp_path, loaded, device="cuda").cuda()  # .cuda(): the buffers empty_weights kept
    assert loaded.model.layers[0].mlp.up_proj.weight.is_cuda
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == (torch.int8 if scheme == "int8" else torch.float8_e4m3fn)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.no_grad():
        expected = torch.compile(model.cuda(), backend=fxquant.backend(config))(ids, use_cache=False).logits
        torch._dynamo.reset()
        actual = torch.compile(loaded, backend=fxquant.backend(config))(ids, use_cache=False).logits
    assert relative_error(actual.float(), expected.float()) < 1e-3
