"""int8 on CUDA (gpu marker): fxquant::int8_rowwise_mm's lowering, each GEMM choice and max-autotune,
against the op's CPU reference bit for bit (the int32 sums are exact, and every choice applies the
scales in the reference's order); int8_linear compiled in a model, with CUDA graphs and a dynamic
batch; what scheme="auto" picks on this GPU."""

import pytest
import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.utils import run_and_get_code

import fxquant
from fxquant.ops.int8 import quantize_int8_rowwise
from tests.models import relative_error, tiny_llama

pytestmark = pytest.mark.gpu
SHAPES = [(512, 256), (208, 272), (1024, 4096)]  # N = 208, K = 272: no multiple of a block
GEMM_IN_CODE = {
    "triton": "triton_tem_fused",
    "cublas": "extern_kernels._int_mm(",
    "splitk": "fxquant_int8_rowwise_mm_splitk",
    "by_rows": "fxquant_int8_rowwise_mm_by_rows",
}


def operands(m, n, k):
    torch.manual_seed(0)
    x_q, x_scale = quantize_int8_rowwise(torch.randn(m, k, device="cuda") * 2)
    w_q, w_scale = quantize_int8_rowwise(torch.randn(n, k, device="cuda") / k**0.5)
    return x_q, w_q, x_scale, w_scale


def compiled_gemm(args, patches, out_dtype=torch.float32):
    def gemm(x_q, w_q, x_scale, w_scale):
        return torch.ops.fxquant.int8_rowwise_mm(x_q, w_q, x_scale, w_scale, out_dtype)

    compiled = torch.compile(gemm, dynamic=False, backend=lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches))
    out, (code, *_) = run_and_get_code(compiled, *args)
    return out.cpu(), gemm(*(t.cpu() for t in args)), code


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemm", list(GEMM_IN_CODE))
@pytest.mark.parametrize("m", [1, 7, 16, 100, 512])
@pytest.mark.parametrize("n,k", SHAPES)
def test_each_gemm_choice_gives_the_references_bits(monkeypatch, gemm, m, n, k, out_dtype):
    """In float32 and rounded once to bf16 in the GEMM (a layer without bias)."""
    if (gemm == "splitk" and m > 16) or (gemm == "cublas" and m <= 16):
        pytest.skip(f"{gemm} does not take M={m}")
    monkeypatch.setenv("FXQUANT_INT8_GEMM", gemm)
    out, expected, code = compiled_gemm(operands(m, n, k), {"force_disable_caches": True}, out_dtype)
    assert GEMM_IN_CODE[gemm] in code, f"the GEMM is not {gemm}:\n{code}"
    assert out.dtype == out_dtype
    assert torch.equal(out, expected), f"{gemm} M={m} N={n} K={k}: {(out - expected).abs().max().item():.3e} off"


@pytest.mark.parametrize("m", [1, 16, 512])
def test_max_autotune_picks_one_choice(m):
    out, expected, code = compiled_gemm(operands(m, 1024, 4096), {"force_disable_caches": True, "max_autotune_gemm": True})
    picked = [name for name, marker in GEMM_IN_CODE.items() if marker in code]
    assert len(picked) == 1, f"want exactly one GEMM in the code, found {picked}"
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_a_model_compiles_to_int8_with_merges_cuda_graphs_and_a_dynamic_batch(mode):
    model = tiny_llama().to("cuda", torch.bfloat16)
    backend = fxquant.backend(scheme="int8")
    compiled = torch.compile(model, backend=backend, mode=mode)
    reference_backend = fxquant.backend(scheme="int8", keep_graphs=True)

    def eager_ops(gm, inputs, **_):  # the same rewrite, run eagerly: the ops' CUDA kernels
        reference_backend.rewrite(gm)
        return gm.forward

    reference = torch.compile(model, backend=eager_ops)
    with torch.no_grad():
        for batch, length in [(1, 1), (16, 1), (2, 33), (4, 40)]:  # the second shape makes M dynamic
            tokens = torch.randint(0, 64, (batch, length), device="cuda")
            out, want = compiled(tokens).logits.float(), reference(tokens).logits.float()
            assert relative_error(out, want) < 2e-2, (batch, length)
    notes = {row.layer: row.note for row in backend.plans[0]}
    assert notes["model.layers.0.mlp.gate_proj"].endswith("one GEMM with up_proj")
    assert {row.scheme for row in backend.plans[0]} == {"int8", None}


def test_auto_on_this_gpu():
    capability = torch.cuda.get_device_capability()
    decision = fxquant.QuantConfig().decide("layer", torch.device("cuda"))
    assert decision.scheme == ("fp8_rowwise" if capability >= (8, 9) else "int8")
    assert decision.note.startswith(f"auto -> {decision.scheme}: ")
