"""CUDA paths of the ops against the CPU reference, and FBGEMM's quantizer bit for bit (gpu marker).

Run on the lent device (../shared/device/README.md); skipped without CUDA.
"""

import pytest
import torch

import fxquant
import fxquant.ops.fp8_rowwise as fp8_module
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.int8 import quantize_int8_rowwise
from tests.models import MLP, relative_error, tiny_llama

pytestmark = pytest.mark.gpu
SHAPES = [(1, 4096), (16, 4096), (333, 1024), (2048, 4096), (4, 8, 512)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_ub", [None, 1200.0, 0.5])
def test_reference_quantizer_matches_fbgemm_bit_for_bit(shape, scale_ub):
    if not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai not installed")
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 3
    x[0, ..., :] = 0  # an all-zero row takes the minimum-scale guard
    ub = None if scale_ub is None else torch.tensor([scale_ub], device="cuda")
    theirs_q, theirs_scale = torch.ops.fbgemm.quantize_fp8_per_row(x, None, ub)
    ours_q, ours_scale = quantize_fp8_rowwise(x, scale_ub)
    assert torch.equal(ours_scale.flatten(), theirs_scale.flatten())
    assert torch.equal(bits(ours_q), bits(theirs_q))
    op_q, op_scale = torch.ops.fxquant.quantize_fp8_per_row(x, scale_ub)
    assert torch.equal(bits(op_q), bits(theirs_q)) and op_scale.shape == x.shape[:-1]


def cpu_reference(op, x, *weight_args, extra=()):
    moved = [None if a is None else a.cpu() for a in (x, *weight_args)]
    return op(*moved, *extra)


@pytest.mark.parametrize("use_fbgemm", [True, False], ids=["fbgemm", "scaled_mm"])
@pytest.mark.parametrize("m", [1, 16, 1024])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_linear_cuda_matches_cpu_reference(monkeypatch, use_fbgemm, m, with_bias):
    if use_fbgemm and not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai not installed")
    monkeypatch.setattr(fp8_module, "fbgemm_genai_available", lambda: use_fbgemm)
    torch.manual_seed(0)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(1024, 4096, device="cuda") / 64)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16) if with_bias else None
    y = torch.ops.fxquant.fp8_rowwise_linear(x, w_q, w_scale, bias, None)
    expected = cpu_reference(torch.ops.fxquant.fp8_rowwise_linear, x, w_q, w_scale, bias, extra=(None,))
    assert y.dtype == torch.bfloat16 and y.shape == (m, 1024)
    # bf16 output and fast accumulation: a few bf16 ulps.
    assert relative_error(y.cpu(), expected) < 1e-2


@pytest.mark.parametrize("m", [1, 16, 17, 1024])
def test_int8_linear_cuda_matches_cpu_reference(m):
    torch.manual_seed(0)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    w_q, w_scale = quantize_int8_rowwise(torch.randn(1024, 4096, device="cuda") / 64)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.fxquant.int8_linear(x, w_q, w_scale, bias)
    expected = cpu_reference(torch.ops.fxquant.int8_linear, x, w_q, w_scale, bias)
    assert relative_error(y.cpu(), expected) < 1e-2  # int32 accumulation is exact; bf16 rounding remains


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8"])
def test_backend_on_cuda_bf16(scheme):
    torch.manual_seed(0)
    model = MLP(dim=256, hidden=512).cuda().to(torch.bfloat16)
    x = torch.randn(8, 32, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        error = relative_error(torch.compile(model, backend="fxquant", options={"scheme": scheme})(x), model(x))
    assert 0 < error < 0.08
    assert torch._dynamo.utils.counters["fxquant"][f"{scheme}_linear"] == 2


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8"])
def test_tiny_llama_on_cuda(scheme):
    model = tiny_llama().cuda().to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    backend = fxquant.backend(scheme=scheme)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.float()
        logits = torch.compile(model, backend=backend)(ids, use_cache=False).logits.float()
    assert sum(len(plan.rewritten) for plan in backend.plans) == 14
    assert 0 < relative_error(logits, expected) < 0.1


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "fp8_blockwise", "int8"])
def test_merged_projections_on_cuda_match_the_per_layer_ones(scheme):
    """q/k/v and gate/up as one GEMM each (the default) against one GEMM per layer: the same
    quantized operands, so only the kernels' accumulation order and bf16 rounding differ."""
    from tests.models import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    config.hidden_size, config.intermediate_size, config.head_dim = 256, 512, 64  # whole 128 x 128 blocks
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval().cuda()
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        merged = torch.compile(model, backend=fxquant.backend(scheme=scheme))(ids, use_cache=False).logits.float()
        assert torch._dynamo.utils.counters["fxquant"]["merged_linears"] == 10
        torch._dynamo.reset()
        per_layer = torch.compile(model, backend=fxquant.backend(scheme=scheme, merge_parallel_linears=False))(
            ids, use_cache=False).logits.float()
    assert relative_error(merged, per_layer) < 1e-2
