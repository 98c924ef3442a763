"""The CUDA-only branches of the ops that other gpu tests leave out (gpu marker): the quantizer's
fallback where FBGEMM's kernel does not apply, the weight quantizers on the GPU, the run-time GEMM
pick by rows, no tokens, cuBLAS's blockwise padding and its Triton fallback, and the error on a
GPU without FP8. Quantized values compare bit for bit with the CPU reference.
"""

import pytest
import torch

import fxquant.ops.cublas_blockwise as cublas_module
import fxquant.ops.fp8_blockwise as blockwise_module
import fxquant.ops.fp8_rowwise as rowwise_module
import fxquant.ops.fp8_tensorwise as tensorwise_module
from fxquant.inductor.tuning import device_tuning
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight, quantize_fp8_groupwise
from fxquant.ops.fp8_rowwise import (
    fbgemm_rowwise_mm,
    quantize_fp8_rowwise,
    rowwise_mm_by_rows,
    scaled_mm_rowwise,
)
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from fxquant.ops.int8 import quantize_int8_rowwise
from tests.kernels.test_cuda_compiled_quantization import bits
from tests.models import relative_error

pytestmark = pytest.mark.gpu
FBGEMM_MAX_ROWS = device_tuning().fbgemm_max_rows  # this machine's GPU's bound (fxquant/inductor/tuning.py)


def cuda_and_cpu(shape, dtype, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 5
    x[1] = 0  # an all-zero row
    return x.to(dtype).cuda(), x.to(dtype)


@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 64), (torch.float16, 64), (torch.bfloat16, 33)],
                         ids=["fp32", "fp16", "bf16_odd_k"])
@pytest.mark.parametrize("scale_ub", [None, 2.0])
def test_rowwise_quantizer_outside_fbgemms_kernel_is_the_reference(dtype, k, scale_ub):
    """FBGEMM's quantizer takes bf16 rows of even length; anything else runs the reference on CUDA."""
    x, x_cpu = cuda_and_cpu((16, k), dtype)
    ours_q, ours_scale = torch.ops.fxquant.quantize_fp8_per_row(x, scale_ub)
    cpu_q, cpu_scale = quantize_fp8_rowwise(x_cpu, scale_ub)
    assert torch.equal(bits(ours_q.cpu()), bits(cpu_q)) and torch.equal(ours_scale.cpu(), cpu_scale)


@pytest.mark.parametrize("quantizer", [
    quantize_fp8_rowwise,
    lambda w: quantize_fp8_blockwise_weight(w, (128, 128)),
    lambda w: quantize_fp8_blockwise_weight(w, (32, 64)),
    quantize_fp8_tensorwise,
    lambda w: quantize_fp8_groupwise(w, 128, 3.0),
    quantize_int8_rowwise,
], ids=["rowwise", "blockwise_128", "blockwise_32x64", "tensorwise", "groupwise_ub", "int8"])
def test_quantizers_on_cuda_equal_the_cpu_reference(quantizer):
    """Weights are quantized where they live (the GPU at compile time): the same codes and scales as on the CPU."""
    w, w_cpu = cuda_and_cpu((256, 512), torch.bfloat16)
    (q, scale), (q_cpu, scale_cpu) = quantizer(w), quantizer(w_cpu)
    assert torch.equal(q.cpu().view(torch.uint8), q_cpu.view(torch.uint8)) and torch.equal(scale.cpu(), scale_cpu)


@pytest.mark.parametrize("rows", [1, FBGEMM_MAX_ROWS, FBGEMM_MAX_ROWS + 1])
def test_rowwise_gemm_by_rows_picks_fbgemm_up_to_its_bound_then_cublas(rows):
    if not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai not installed")
    x_q, x_scale = quantize_fp8_rowwise(torch.randn(rows, 1024, device="cuda"))
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(512, 1024, device="cuda") / 32)
    picked = fbgemm_rowwise_mm if rows <= FBGEMM_MAX_ROWS else scaled_mm_rowwise
    assert torch.equal(rowwise_mm_by_rows(x_q, w_q, x_scale, w_scale), picked(x_q, w_q, x_scale, w_scale))


def weights_for(op_name, n=256, k=512):
    w = torch.randn(n, k, device="cuda") / 16
    if op_name == "fp8_blockwise_linear":
        return quantize_fp8_blockwise_weight(w, (128, 128))
    if op_name == "int8_linear":
        return quantize_int8_rowwise(w)
    return (quantize_fp8_tensorwise if op_name.startswith("fp8_tensorwise") else quantize_fp8_rowwise)(w)


LINEARS = ["fp8_rowwise_linear", "fp8_blockwise_linear", "fp8_tensorwise_linear", "int8_linear"]


@pytest.mark.parametrize("op_name", [*LINEARS, "fp8_tensorwise_static_linear"])
def test_linears_on_cuda_take_zero_tokens(op_name):
    x = torch.randn(0, 512, device="cuda", dtype=torch.bfloat16)
    w_q, w_scale = weights_for(op_name)
    op = getattr(torch.ops.fxquant, op_name)
    if op_name == "fp8_tensorwise_static_linear":
        y = op(x, w_q, 0.01 * float(w_scale), None, 0.01)
    else:
        y = op(x, w_q, w_scale, None) if op_name == "int8_linear" else op(x, w_q, w_scale, None, None)
    assert y.shape == (0, 256) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("rows", [1, 2, 3, 301])
def test_cublas_blockwise_pads_rows_to_a_multiple_of_four(rows):
    if not cublas_module.cublas_blockwise_works(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("cuBLAS blockwise scaling is unavailable on this GPU/CUDA (the log says why)")
    from fxquant.kernels.fp8_blockwise_gemm import fp8_blockwise_gemm

    x_q, x_scale = quantize_fp8_groupwise(torch.randn(rows, 1024, device="cuda") * 3, 128)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(512, 1024, device="cuda") / 32, (128, 128))
    cublas = cublas_module.cublas_blockwise_mm(x_q, x_scale, w_q, w_scale)
    assert cublas.shape == (rows, 512)
    assert relative_error(cublas, fp8_blockwise_gemm(x_q, x_scale, w_q, w_scale, 128, 128)) < 1e-2


def test_blockwise_gemm_takes_triton_where_cublas_failed_its_check(monkeypatch):
    from fxquant.kernels.fp8_blockwise_gemm import fp8_blockwise_gemm

    device = torch.device("cuda", torch.cuda.current_device())
    monkeypatch.setitem(cublas_module._CUBLAS_BLOCKWISE_WORKS, device, False)
    x_q, x_scale = quantize_fp8_groupwise(torch.randn(64, 1024, device="cuda") * 3, 128)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(512, 1024, device="cuda") / 32, (128, 128))
    out = torch.ops.fxquant.fp8_blockwise_mm(x_q, x_scale, w_q, w_scale)
    assert torch.equal(out, fp8_blockwise_gemm(x_q, x_scale, w_q, w_scale, 128, 128))


@pytest.mark.parametrize("module", [rowwise_module, blockwise_module, tensorwise_module], ids=lambda m: m.__name__)
def test_fp8_linear_on_a_gpu_without_fp8_says_to_use_int8(monkeypatch, module):
    monkeypatch.setattr(module, "fp8_unsupported_reason", lambda device: "NVIDIA A100 (sm_80) has no FP8 tensor cores")
    op_name = {rowwise_module: "fp8_rowwise_linear", blockwise_module: "fp8_blockwise_linear",
               tensorwise_module: "fp8_tensorwise_linear"}[module]
    w_q, w_scale = weights_for(op_name)
    with pytest.raises(RuntimeError, match=r"sm_80\) has no FP8 tensor cores; use scheme='int8'"):
        getattr(torch.ops.fxquant, op_name)(torch.randn(4, 512, device="cuda", dtype=torch.bfloat16), w_q, w_scale, None, None)
