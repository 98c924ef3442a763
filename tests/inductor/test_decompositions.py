"""fxquant's Inductor lowering (fxquant/inductor/decompositions.py): the FP8 activation quantization
is generated inside the kernel that produces the activation, and the GEMM is fxquant::fp8_rowwise_mm,
lowered to the kernel fxquant picks (fxquant/inductor/fp8_rowwise_mm.py).

Checked on the CPU (Inductor's C++ backend; the GEMM op runs its reference) and on the GPU (Triton,
gpu marker: each GEMM choice, and max-autotune over all of them). Numerics against the unfused reference op: the fused kernel quantizes the RMSNorm
output before it is rounded to bf16, so a few elements land on a neighbouring e4m3 value.
"""

import pytest
import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.utils import run_and_get_code

from fxquant.inductor.install import scheme_decompositions
from fxquant.inductor.settings import fxquant_inductor_settings
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from tests.models import relative_error


def rms_norm(x, weight):
    """Llama's RMSNorm, as HF writes it: float32 statistics, the weight applied in x's dtype."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + 1e-6)).to(x.dtype) * weight


class RMSNormLinear(torch.nn.Module):
    """Llama's RMSNorm feeding a linear layer: the pair whose quantization must fuse."""

    def __init__(self, dim=256, out=512):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.ones(dim))
        self.proj = torch.nn.Linear(dim, out, bias=False)

    def forward(self, x):
        return self.proj(rms_norm(x, self.norm_weight))


def compile_with_lowering(fn):
    table = {**select_decomp_table(), **scheme_decompositions()}
    patches = fxquant_inductor_settings({})  # the backend's, default mode
    return torch.compile(fn, backend=lambda gm, inputs: compile_fx(gm, inputs, decompositions=table, config_patches=patches))


def kernels(code: str) -> list[str]:
    """The generated kernels, one string each: its name (Triton) or signature (C++) and its source, up
    to the source's closing quotes (the wrapper code after the last kernel names the ops it calls)."""
    marker = "async_compile.triton(" if "async_compile.triton(" in code else "async_compile.cpp_pybinding("
    return ["'''".join(chunk.split("'''", 2)[:2]) for chunk in code.split(marker)[1:]]


# What each GEMM choice leaves in Inductor's generated code.
GEMM_IN_CODE = {
    "cpu": "torch.ops.fxquant.fp8_rowwise_mm.default(",
    "triton": "triton_tem_fused",
    "fbgemm": "fxquant_fbgemm_f8f8bf16_rowwise",
    "scaled_mm": "fxquant_scaled_mm",
    "by_rows": "fxquant_rowwise_mm_by_rows",
    "splitk": "fxquant_fp8_rowwise_mm_splitk",
}


def check_fused(device, gemm):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(512, 256, device=device) / 16)

    def rmsnorm_linear(x):
        h = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        return torch.ops.fxquant.fp8_rowwise_linear(h, w_q, w_scale, None, None)

    x = torch.randn(8, 64, 256, device=device, dtype=dtype)
    out, (code, *_) = run_and_get_code(compile_with_lowering(rmsnorm_linear), x)
    generated = [k for k in kernels(code) if not k.startswith("'triton_tem_")]  # the GEMM template aside
    assert len(generated) == 1, f"want one kernel (RMSNorm + quantization), got {len(generated)}:\n{code}"
    # rsqrt: Triton's libdevice.rsqrt, C++'s 1 / std::sqrt
    assert "sqrt" in generated[0] and "float8" in generated[0].lower(), "the quantization is not in the RMSNorm kernel"
    assert GEMM_IN_CODE[gemm] in code, f"the GEMM is not {gemm}:\n{code}"
    error = relative_error(out, rmsnorm_linear(x))
    # emulate_precision_casts makes the fused kernel quantize the bf16-rounded RMSNorm output, as
    # eager does; what remains is the RMSNorm itself (Triton's rsqrt and reduction order), the
    # GEMM's accumulation order and the final bf16 rounding. Measured: 3.4e-5 on the CPU, 1.9e-3
    # on the H100.
    bound = 1e-3 if device == "cpu" else 5e-3
    assert error < bound, f"fused lowering vs reference op: relative error {error:.5f}"


@pytest.mark.skipif(
    torch.__version__ < "2.13",
    reason="torch 2.11's C++ backend quantizes the fused RMSNorm output unrounded (emulate_precision_casts "
    "is Triton-only there): 1.3e-2 from the reference; the backend lowers only CUDA graphs",
)
def test_quantization_fuses_into_rmsnorm_on_cpu():
    check_fused("cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "fbgemm", "scaled_mm"])
def test_quantization_fuses_into_rmsnorm_on_gpu(monkeypatch, gemm):
    if gemm == "fbgemm" and not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai is not installed")
    monkeypatch.setenv("FXQUANT_GEMM", gemm)
    with torch._inductor.config.patch(force_disable_caches=True):
        check_fused("cuda", gemm)


@pytest.mark.gpu
def test_backend_uses_the_lowering_on_cuda():
    torch.manual_seed(0)
    model = RMSNormLinear().cuda().to(torch.bfloat16)
    x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(torch.compile(model, backend="fxquant"), x)
        expected = model(x)
    # M = 128: FBGEMM's GEMM by fxquant's heuristic, cuBLAS's without fbgemm-gpu-genai
    assert GEMM_IN_CODE["fbgemm" if fbgemm_genai_available() else "scaled_mm"] in code
    assert "torch.ops.fxquant.fp8_rowwise_linear" not in code and "torch.ops.fxquant.fp8_rowwise_mm.default(" not in code, (
        "the ops should be lowered, not called as extern kernels"
    )
    assert len(kernels(code)) == 1, f"want one kernel (RMSNorm + quantization):\n{code}"
    assert 0 < relative_error(out, expected) < 0.08


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_tensorwise_lowering_matches_the_reference_op_on_cpu(static):
    from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise

    torch.manual_seed(0)
    w_q, w_scale = quantize_fp8_tensorwise(torch.randn(512, 256) / 16)
    bias = torch.randn(512, dtype=torch.bfloat16)
    x_scale = 4.0 / 448

    def linear(x):
        if static:
            return torch.ops.fxquant.fp8_tensorwise_static_linear(x, w_q, x_scale * float(w_scale), bias, x_scale)
        return torch.ops.fxquant.fp8_tensorwise_linear(x, w_q, w_scale, bias, None)

    x = torch.randn(8, 64, 256, dtype=torch.bfloat16)
    out, (code, *_) = run_and_get_code(compile_with_lowering(linear), x)
    assert "_scaled_mm" in code and "torch.ops.fxquant" not in code
    error = relative_error(out, linear(x))
    # The lowering adds the bias to the bf16 GEMM output, one bf16 rounding more than the
    # reference's float32 epilogue: measured 2.4e-3, about one bf16 ulp.
    assert error < 5e-3, f"tensorwise lowering vs reference op: relative error {error:.5f}"


@pytest.mark.parametrize("block", [(128, 128), (32, 64)])
def test_blockwise_lowering_matches_the_reference_op_on_cpu(block):
    """The group quantization becomes Inductor code; the GEMM stays fxquant's op (cuBLAS or Triton on CUDA)."""
    from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight

    torch.manual_seed(0)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(256, 256) / 16, block)
    bias = torch.randn(256, dtype=torch.bfloat16)

    def linear(x):
        return torch.ops.fxquant.fp8_blockwise_linear(x, w_q, w_scale, bias, None)

    x = torch.randn(8, 64, 256, dtype=torch.bfloat16)
    out, (code, *_) = run_and_get_code(compile_with_lowering(linear), x)
    assert "torch.ops.fxquant.fp8_blockwise_mm.default(" in code and "fp8_blockwise_linear.default(" not in code
    assert len(kernels(code)) == 2, f"want the quantization kernel and the bias/cast epilogue:\n{code}"
    error = relative_error(out, linear(x))
    # One bf16 rounding more than the reference (the bias is added to the bf16 GEMM output).
    assert error < 5e-3, f"blockwise lowering vs reference op: relative error {error:.5f}"


@pytest.mark.skipif(torch.__version__ < "2.13", reason="torch 2.11's C++ backend does not emulate the bf16 rounding (see above)")
@pytest.mark.parametrize("config", [
    {"scheme": "fp8_rowwise"},
    {"scheme": "fp8_blockwise", "weight_block_size": (32, 32)},
    {"scheme": "fp8_tensorwise"},
], ids=lambda c: c["scheme"])
def test_tiny_llama_through_the_cuda_lowering_equals_the_reference_ops(monkeypatch, config):
    """The whole backend, with the CPU counted as a device fxquant lowers on (as CUDA is), run by
    Inductor's C++ backend on a real model: every quantized linear is lowered (no fxquant *_linear op
    left in the code), and the logits equal, bit for bit, those of the same rewritten graph run
    eagerly (fxquant's reference ops): emulate_precision_casts rounds every fused intermediate as
    eager does."""
    import fxquant
    from fxquant.inductor import install
    from tests.models import tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = fxquant.Backend(fxquant.QuantConfig(**config))

    def rewrite_only(gm, inputs):
        reference.rewrite(gm)
        return gm.forward

    monkeypatch.setattr(install, "LOWERED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    backend = fxquant.backend(**config)
    with torch.no_grad():
        expected = torch.compile(model, backend=rewrite_only)(ids, use_cache=False).logits
        torch._dynamo.reset()
        lowered, (code, *_) = run_and_get_code(torch.compile(model, backend=backend), ids, use_cache=False)
    assert sum(len(plan.rewritten) for plan in backend.plans) == 14
    assert "_linear.default(" not in code, "a quantized linear was not lowered"
    assert torch.equal(lowered.logits, expected), f"relative error {relative_error(lowered.logits, expected):.2e}"
