"""Expert sites on CUDA (gpu marker): a tiny Qwen3-MoE in bf16 whose experts run through transformers'
batched_mm and grouped_mm implementations (on CUDA: torch's grouped GEMM, not the CPU fallback op)
compiles with fxquant, plans every expert tensor, and matches the same model's CPU reference ops."""

import pytest
import torch

import fxquant
from tests.models import relative_error

pytestmark = pytest.mark.gpu
FP8 = fxquant.QuantConfig(scheme="fp8_rowwise")  # CPU references and CUDA alike (auto is int8 on the CPU)


def tiny_qwen3_moe(implementation: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
    )
    config._experts_implementation = implementation
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval().to(torch.bfloat16)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_qwen3_moe_experts_compile_on_cuda_and_match_the_cpu_reference(implementation):
    model = tiny_qwen3_moe(implementation)
    tokens = torch.randint(0, 128, (2, 7))
    backend = fxquant.backend(FP8)
    with torch.no_grad():
        expected = model(tokens).logits.float()
        cpu = torch.compile(model, backend=fxquant.backend(FP8))(tokens).logits.float()  # on the CPU: the reference ops
        model.cuda()
        actual = torch.compile(model, backend=backend)(tokens.cuda()).logits.float().cpu()
    rows = {row.layer: row for row in backend.plans[0]}
    assert rows["model.layers.1.mlp.experts.gate_up_proj"].scheme == "fp8_rowwise"
    assert rows["model.layers.1.mlp.experts.down_proj"].shape == "8 x 128 x 64"
    print(backend.plans[0])
    # The same quantized model compiled for the CPU (reference ops) and for CUDA: bf16 kernels that round
    # differently (attention, RMSNorm) flip some FP8 activation codes, 2.7-3.0 % apart on the H200.
    assert relative_error(actual, cpu) < 0.05
    assert 0 < relative_error(actual, expected) < 0.08


@pytest.mark.parametrize("kind", ["batched", "grouped", "grouped_rows"])
def test_expert_ops_on_cuda_equal_the_cpu_reference(kind):
    """The ops on the same inputs. The CUDA kernels accumulate e4m3 products with Hopper's fast FP8
    accumulation (use_fast_accum, as the dense op) and round to bf16 once more: measured on the H200,
    3.7-4.4 % of the outputs differ, by up to 0.25 (outputs of order 16, one or two bf16 steps), so
    the bound is a relative error, as for the dense op (tests/kernels/test_cuda_ops.py). grouped_rows:
    the grouped op reading rows of x (`rows`: x quantized on the device first, then gathered)."""
    from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

    torch.manual_seed(0)
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(8, 128, 256))
    if kind == "batched":
        op, rows = torch.ops.fxquant.fp8_rowwise_batched_mm, torch.randint(0, 8, (40,))
    else:
        op, rows = torch.ops.fxquant.fp8_rowwise_grouped_mm, torch.tensor([5, 5, 12, 20, 21, 30, 38, 38], dtype=torch.int32)
    gathered = () if kind != "grouped_rows" else (None, torch.randint(0, 40, (40,)))  # x's rows, each token gathered anew
    expected = op(x, w_q, w_scale, rows, *gathered)
    actual = op(x.cuda(), w_q.cuda(), w_scale.cuda(), rows.cuda(), *(t if t is None else t.cuda() for t in gathered)).cpu()
    assert relative_error(actual, expected) < 1e-2
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-6, atol=0.3)


# The fast path (fxquant/ops/fp8_rowwise_grouped_gemm.py, fxquant/inductor/fp8_rowwise_grouped_mm.py).

GROUPED_KERNELS = ["scaled_grouped_mm", "fbgemm", "triton"]


def grouped_operands(device, rows=40, n=128, k=256, counts=(5, 0, 7, 8, 1, 9, 8, 0)):
    """Operands of the grouped GEMM: experts with no rows, 38 of 40 rows in groups (2 past the last)."""
    from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

    torch.manual_seed(0)
    x_q, x_scale = quantize_fp8_rowwise(torch.randn(rows, k) * 2)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(len(counts), n, k) / k**0.5)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    return [t.to(device) for t in (x_q, w_q, x_scale, w_scale, offsets)]


@pytest.mark.parametrize("kernel", GROUPED_KERNELS)
def test_each_grouped_gemm_kernel_equals_the_reference_op(kernel):
    """Each CUDA choice against the GEMM op's CPU reference, on the rows in groups (the rest unspecified)."""
    from fxquant.ops.fp8_rowwise_grouped_gemm import KERNELS, available_kernels

    if kernel not in available_kernels(128, 256):
        pytest.skip(f"{kernel} does not run here")
    cpu = grouped_operands("cpu")
    expected = torch.ops.fxquant.fp8_rowwise_grouped_gemm(*cpu)
    actual = KERNELS[kernel](*grouped_operands("cuda")).cpu()
    torch.testing.assert_close(actual[:38], expected[:38], rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("kind", ["batched", "grouped"])
def test_expert_ops_run_in_a_cuda_graph(kind):
    """No host sync on the CUDA path: the op is captured in a CUDA graph and its replay on new routing
    (written into the captured tensors) equals the reference; rows past the groups are 0."""
    from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

    torch.manual_seed(0)
    w_q, w_scale = (t.cuda() for t in quantize_fp8_rowwise(torch.randn(8, 128, 256) / 16))
    x = torch.randn(16, 256, dtype=torch.bfloat16, device="cuda")
    if kind == "batched":
        op, rows, new_rows = torch.ops.fxquant.fp8_rowwise_batched_mm, torch.randint(0, 8, (16,)), torch.randint(0, 8, (16,))
    else:
        op = torch.ops.fxquant.fp8_rowwise_grouped_mm
        rows = torch.tensor([2, 2, 4, 8, 8, 10, 14, 16], dtype=torch.int32)
        new_rows = torch.tensor([0, 3, 3, 3, 9, 9, 12, 15], dtype=torch.int32)
    rows = rows.cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        op(x, w_q, w_scale, rows)  # warm up (kernels compiled, libraries loaded) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, w_q, w_scale, rows)
    rows.copy_(new_rows.cuda())
    graph.replay()
    expected = op(x.cpu(), w_q.cpu(), w_scale.cpu(), new_rows)
    torch.testing.assert_close(out.cpu(), expected, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("kernel", GROUPED_KERNELS)
@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_compiled_qwen3_moe_runs_the_grouped_gemm_kernel(monkeypatch, implementation, kernel):
    """Compiled on CUDA, the expert ops are opened up: the code calls the grouped GEMM kernel chosen
    (FXQUANT_GROUPED_GEMM), not the expert ops, and the logits match the CPU reference ops'."""
    from torch._inductor.utils import run_and_get_code

    from fxquant.ops.fp8_rowwise_grouped_gemm import available_kernels

    if kernel not in available_kernels(128, 128):
        pytest.skip(f"{kernel} does not run here")
    monkeypatch.setenv("FXQUANT_GROUPED_GEMM", kernel)
    model = tiny_qwen3_moe(implementation)
    tokens = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        cpu = torch.compile(model, backend=fxquant.backend(FP8))(tokens).logits.float()
        torch._dynamo.reset()
        model.cuda()
        with torch._inductor.config.patch(force_disable_caches=True):
            out, codes = run_and_get_code(torch.compile(model, backend=fxquant.backend(FP8)), tokens.cuda())
    code = "\n".join(codes)
    assert f"fxquant_grouped_{kernel}" in code, code
    assert "fp8_rowwise_grouped_mm.default(" not in code and "fp8_rowwise_batched_mm.default(" not in code
    assert relative_error(out.logits.float().cpu(), cpu) < 0.05


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_compiled_qwen3_moe_decodes_in_cuda_graphs(implementation):
    """mode="reduce-overhead" at decode shapes: the graph is captured (no sync to the host, no graph
    skipped) and a second call with other tokens replays it, close to the CPU reference ops."""
    from torch._dynamo.utils import counters

    model = tiny_qwen3_moe(implementation)
    inputs = [torch.randint(0, 128, (batch, 1)) for batch in (1, 16, 16)]
    with torch.no_grad():
        reference = torch.compile(model, backend=fxquant.backend(FP8))
        expected = [reference(tokens).logits.float() for tokens in inputs]
        torch._dynamo.reset()
        counters.clear()
        model.cuda()
        compiled = torch.compile(model, backend=fxquant.backend(FP8), mode="reduce-overhead")
        for tokens, logits in zip(inputs, expected):
            out = compiled(tokens.cuda()).logits.float().cpu()
            assert relative_error(out, logits) < 0.05, tokens.shape
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
