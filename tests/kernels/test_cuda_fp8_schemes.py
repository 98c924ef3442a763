"""fp8_blockwise and fp8_tensorwise on CUDA against the CPU reference; fxquant's blockwise Triton
kernel against FBGEMM's `f8f8bf16_blockwise` on the operands both take (gpu marker)."""

import pytest
import torch

import fxquant
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from tests.models import MLP, relative_error

pytestmark = pytest.mark.gpu


def on_cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


@pytest.mark.parametrize("m", [1, 16, 200, 2048])
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_blockwise_linear_cuda_matches_cpu_reference(m, block):
    torch.manual_seed(0)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(768, 1024, device="cuda") / 32, block)
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.fxquant.fp8_blockwise_linear(x, w_q, w_scale, bias, None)
    expected = torch.ops.fxquant.fp8_blockwise_linear(*on_cpu(x, w_q, w_scale, bias), None)
    assert y.shape == (m, 768) and y.dtype == torch.bfloat16
    assert relative_error(y.cpu(), expected) < 1e-2


def test_blockwise_kernel_matches_fbgemm_on_128x128_activation_blocks():
    """FBGEMM's blockwise GEMM scales activations per 128 x 128 block; given such operands (each
    row's group scales repeated over its 128-row block) both kernels compute the same product."""
    if not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai not installed")
    from fxquant.kernels.fp8_blockwise_gemm import fp8_blockwise_gemm  # triton: GPU machines only

    torch.manual_seed(0)
    x_q, x_scale = quantize_fp8_blockwise_weight(torch.randn(512, 1024, device="cuda"), (128, 128))
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(768, 1024, device="cuda") / 32, (128, 128))
    theirs = torch.ops.fbgemm.f8f8bf16_blockwise(x_q, w_q, x_scale, w_scale, 128, 128, 128)
    ours = fp8_blockwise_gemm(x_q, x_scale.repeat_interleave(128, dim=0), w_q, w_scale, 128, 128)
    assert relative_error(ours, theirs) < 1e-2


def test_cublas_and_triton_blockwise_gemms_agree():
    """The two CUDA paths of fp8_blockwise_mm on a Llama-like shape: cuBLAS's blockwise-scaled
    _scaled_mm (when its first-call check passed on this GPU) and fxquant's Triton kernel."""
    from fxquant.kernels.fp8_blockwise_gemm import fp8_blockwise_gemm
    from fxquant.ops.cublas_blockwise import cublas_blockwise_mm, cublas_blockwise_works
    from fxquant.ops.fp8_blockwise import quantize_fp8_groupwise

    if not cublas_blockwise_works(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("cuBLAS blockwise scaling is unavailable on this GPU/CUDA (the log says why)")
    torch.manual_seed(0)
    x_q, x_scale = quantize_fp8_groupwise(torch.randn(300, 4096, device="cuda") * 3, 128)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(1024, 4096, device="cuda") / 64, (128, 128))
    triton = fp8_blockwise_gemm(x_q, x_scale, w_q, w_scale, 128, 128)
    assert relative_error(cublas_blockwise_mm(x_q, x_scale, w_q, w_scale), triton) < 1e-2


@pytest.mark.parametrize("m", [1, 16, 2048])
def test_tensorwise_linears_cuda_match_cpu_reference(m):
    torch.manual_seed(0)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    w_q, w_scale = quantize_fp8_tensorwise(torch.randn(768, 1024, device="cuda") / 32)
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    dynamic = torch.ops.fxquant.fp8_tensorwise_linear(x, w_q, w_scale, bias, None)
    expected = torch.ops.fxquant.fp8_tensorwise_linear(*on_cpu(x, w_q, w_scale, bias), None)
    assert relative_error(dynamic.cpu(), expected) < 1e-2
    x_scale = 4.0 / 448
    static = torch.ops.fxquant.fp8_tensorwise_static_linear(x, w_q, x_scale * float(w_scale), bias, x_scale)
    expected = torch.ops.fxquant.fp8_tensorwise_static_linear(*on_cpu(x, w_q), x_scale * float(w_scale), bias.cpu(), x_scale)
    assert relative_error(static.cpu(), expected) < 1e-2


@pytest.mark.parametrize("config", [
    fxquant.QuantConfig(scheme="fp8_blockwise"),
    fxquant.QuantConfig(scheme="fp8_tensorwise"),
    fxquant.QuantConfig(scheme="fp8_tensorwise", static_activation_amax={"up": 4.5, "down": 6.0}),
], ids=["blockwise", "tensorwise", "tensorwise_static"])
def test_backend_on_cuda_bf16(config):
    torch.manual_seed(0)
    model = MLP(dim=256, hidden=512).cuda().to(torch.bfloat16)
    x = torch.randn(8, 32, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        error = relative_error(torch.compile(model, backend=fxquant.backend(config))(x), model(x))
    assert 0 < error < 0.1
