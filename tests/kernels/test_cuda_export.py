"""Export, AOTInductor and checkpoints on CUDA (gpu marker): the package runs the kernels the backend
generates (the activation quantization fused into its producer, the GEMM fxquant's template or an
extern kernel called by its op) and matches the exported program; stored FP8 weights, registered by
hand or loaded from a checkpoint onto the GPU, run as they are."""

import functools
import json
import re
import subprocess
import sys

import pytest
import torch
from torch._inductor.async_compile import AsyncCompile

import fxquant
from fxquant import QuantConfig
from fxquant.ops.availability import fbgemm_genai_available
from tests.graphs import aoti_package_calls
from tests.inductor.test_decompositions import RMSNormLinear
from tests.integration.test_export import package_source
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


def compile_configs() -> dict:
    """The configs of the first way the probe found to run a package (none where none runs)."""
    variant, _ = aoti_variant_on_cuda()
    return dict(AOTI_VARIANTS[variant][0]) if variant else {}


def run_package_as_probed(program, package: str, x: torch.Tensor, directory) -> torch.Tensor | None:
    """The package's output for x, run the first way the probe found (None where none runs: torch
    2.11.0+cu130 segfaults loading any CUDA package on the lent H100/H200)."""
    variant, outcomes = aoti_variant_on_cuda()
    print(f"AOTInductor on CUDA: {outcomes}")
    if variant is None:
        return None
    configs, where = AOTI_VARIANTS[variant]
    state = {**program.state_dict, **program.constants} if configs else None
    if where == "fresh process":
        code, actual = run_package(package, (x,), directory, state)
        assert code == 0, f"fxquant's package exits {code} where a plain one runs"
        return actual
    runner = torch._inductor.aoti_load_package(package)
    if state is not None:
        runner.load_constants(state, check_full_update=True)
    with torch.no_grad():
        return runner(x)


# fp8_rowwise_mm's choices (fxquant/inductor/fp8_rowwise_mm.py, FXQUANT_GEMM) → the op a package calls for
# each (None: the template, a kernel of the package).
GEMM_OPS = {"triton": None, "fbgemm": "fxquant::fbgemm_rowwise_mm", "scaled_mm": "fxquant::scaled_mm_rowwise",
            "by_rows": "fxquant::fp8_rowwise_mm", "splitk": "fxquant::fp8_rowwise_mm_splitk"}

# int8_rowwise_mm's (fxquant/inductor/int8_rowwise_mm.py, FXQUANT_INT8_GEMM): the same, cuBLAS's being aten's _int_mm.
INT8_GEMM_OPS = {None, "fxquant::int8_rowwise_mm_by_rows", "fxquant::int8_rowwise_mm_splitk"}


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8"])
def test_aoti_package_on_cuda(tmp_path, scheme):
    """torch's own aoti_compile_and_package after `import fxquant`: both schemes are lowered, so the
    package calls their GEMM ops at most (the Triton templates are kernels of the package)."""
    torch.manual_seed(0)
    model = MLP(dim=256, hidden=512).cuda().to(torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    program = fxquant.export(model, (x,), config=QuantConfig(scheme=scheme))
    # a copy: aoti_compile_and_package adds its own keys to the dict it is given
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "mlp.pt2"), inductor_configs=compile_configs())
    calls = aoti_package_calls(package)
    gemm_ops = INT8_GEMM_OPS if scheme == "int8" else set(GEMM_OPS.values())
    assert set(calls) <= gemm_ops, f"the package calls more than fxquant's GEMMs: {calls}"
    actual = run_package_as_probed(program, package, x, tmp_path)
    if actual is None:
        pytest.skip(f"AOTInductor cannot run a plain nn.Linear package on CUDA with torch {torch.__version__}")
    with torch.no_grad():
        expected = program.module()(x)
        assert relative_error(actual, expected) < 1e-2
        assert 0 < relative_error(expected, model(x)) < 0.08


@pytest.fixture
def triton_sources(monkeypatch) -> dict[str, str]:
    """Each Triton kernel's source by name, as Inductor compiles it while the test runs (a package holds
    the kernels' binaries and their launches by name, in its wrapper .cpp)."""
    sources = {}
    compile_triton = AsyncCompile.triton

    def record(self, kernel_name, source_code, *args, **kwargs):
        sources[kernel_name] = source_code
        return compile_triton(self, kernel_name, source_code, *args, **kwargs)

    monkeypatch.setattr(AsyncCompile, "triton", record)
    return sources


def package_kernels(package: str, sources: dict[str, str]) -> dict[str, str]:
    """name → source of each Triton kernel the package's wrapper launches."""
    launched = set(re.findall(r"\btriton_\w+", package_source(package, "wrapper.cpp")))
    return {name: source for name, source in sources.items() if name in launched}


def check_package_is_fused(package: str, sources: dict[str, str], gemm: str | None) -> None:
    """One Inductor kernel computes the RMSNorm, the row amax and the e4m3 cast; fp8_rowwise_linear
    is not called; the GEMM is `gemm`'s (None: any of fxquant's), the template kernel or an op call."""
    calls = aoti_package_calls(package)
    kernels = package_kernels(package, sources)
    inductors = [source for name, source in kernels.items() if not name.startswith("triton_tem_")]
    assert "fxquant::fp8_rowwise_linear" not in calls, f"the linear op is called whole: {calls}"
    assert len(inductors) == 1, f"want one kernel (RMSNorm + quantization), got {list(kernels)}"
    assert all(part in inductors[0] for part in ("rsqrt", "max2", "float8")), f"not fused:\n{inductors[0]}"
    template = [name for name in kernels if name.startswith("triton_tem_")]
    if gemm is None:
        assert (template and not calls) or (not template and len(calls) == 1 and calls[0] in GEMM_OPS.values()), (
            f"the GEMM is neither fxquant's template nor one of its ops: {list(kernels)}, {calls}"
        )
    elif GEMM_OPS[gemm] is None:
        assert template and not calls, f"want the template GEMM: {list(kernels)}, {calls}"
    else:
        assert calls == [GEMM_OPS[gemm]] and not template, f"want {GEMM_OPS[gemm]}: {list(kernels)}, {calls}"


def export_rmsnorm_linear() -> tuple:
    """An RMSNorm → linear model (bf16, 8 tokens) exported by fxquant, and its input."""
    torch.manual_seed(0)
    model = RMSNormLinear().cuda().to(torch.bfloat16)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    return fxquant.export(model, (x,)), x


@pytest.mark.parametrize("gemm", [None, *GEMM_OPS], ids=lambda gemm: gemm or "heuristic")
def test_fxquant_aoti_package_runs_the_fused_kernels(tmp_path, monkeypatch, triton_sources, gemm):
    if gemm is None:
        monkeypatch.delenv("FXQUANT_GEMM", raising=False)
    elif gemm == "fbgemm" and not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai is not installed")
    else:
        monkeypatch.setenv("FXQUANT_GEMM", gemm)
    program, x = export_rmsnorm_linear()
    package = fxquant.aoti_compile_and_package(
        program, package_path=str(tmp_path / "rmsnorm.pt2"), inductor_configs={"force_disable_caches": True, **compile_configs()}
    )
    check_package_is_fused(package, triton_sources, gemm)
    actual = run_package_as_probed(program, package, x, tmp_path)
    if actual is not None:
        with torch.no_grad():
            # fxquant's settings: the reference's rounding; as test_quantization_fuses_into_rmsnorm_on_gpu
            assert relative_error(actual, program.module()(x)) < 5e-3


def test_plain_aoti_package_after_import_fxquant_runs_the_fused_kernels(tmp_path, monkeypatch, triton_sources):
    monkeypatch.delenv("FXQUANT_GEMM", raising=False)
    program, x = export_rmsnorm_linear()
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "rmsnorm.pt2"), inductor_configs={"force_disable_caches": True, **compile_configs()}
    )
    check_package_is_fused(package, triton_sources, None)
    actual = run_package_as_probed(program, package, x, tmp_path)
    if actual is not None:
        with torch.no_grad():
            # Inductor's defaults quantize the unrounded RMSNorm output: a few codes from the reference's
            assert relative_error(actual, program.module()(x)) < 4e-2


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


@pytest.mark.parametrize("scheme, max_shard_size", [("fp8_rowwise", "5GB"), ("int8", "5GB"), ("fp8_rowwise", "20KB")],
                         ids=["fp8_rowwise", "int8", "fp8_rowwise in shards"])
def test_checkpoint_loads_onto_the_gpu_and_compiles(tmp_path, scheme, max_shard_size):
    """A tiny Llama checkpoint (one file, or shards and their index) loaded with device="cuda" into a
    model made under empty_weights(): the stored tensors land on the GPU as they are, and the
    compiled model computes what compiling the float model gives (same weights, same quantization)."""
    from transformers import LlamaForCausalLM

    from tests.models import tiny_llama_config

    # Built the way HF builds a bf16 model (and the loaded one below): rotary frequencies stay fp32.
    # `.to(torch.bfloat16)` would round them, and they are no checkpoint's business (non-persistent).
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_llama_config(), dtype=torch.bfloat16).eval()
    config = QuantConfig(scheme=scheme)
    fxquant.save_quantized(model, tmp_path, config, max_shard_size=max_shard_size)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_size == "20KB")
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
