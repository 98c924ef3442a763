"""fp8_blockwise expert ops and DeepSeek-V3-format checkpoints on CUDA (gpu marker): the ops' CUDA run
(both through fxquant::fp8_blockwise_grouped_gemm, fxquant's blockwise grouped Triton kernel; batched
with its rows ordered by expert on the device) equals their CPU run, also inside a CUDA graph; compiled,
the ops decompose into Inductor's quantization and the grouped GEMM op, and match the CPU reference;
and a finegrained_fp8 checkpoint loads straight onto the GPU and runs its linear layers there."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fxquant
from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight
from tests.models import relative_error

pytestmark = pytest.mark.gpu


def expert_op(kind: str):
    """(op, its rows argument) for 100 rows over 8 experts: random expert ids, or offsets with empty
    groups and rows past the last."""
    if kind == "batched":
        return torch.ops.fxquant.fp8_blockwise_batched_mm, torch.randint(0, 8, (100,))
    return torch.ops.fxquant.fp8_blockwise_grouped_mm, torch.tensor([5, 5, 32, 50, 51, 70, 98, 98], dtype=torch.int32)


@pytest.mark.parametrize("kind", ["batched", "grouped"])
def test_blockwise_expert_ops_on_cuda_equal_the_cpu_reference(kind):
    torch.manual_seed(0)
    x = torch.randn(100, 256, dtype=torch.bfloat16)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(8, 256, 256), (128, 128))
    op, rows = expert_op(kind)
    expected = op(x, w_q, w_scale, rows, None)
    actual = op(x.cuda(), w_q.cuda(), w_scale.cuda(), rows.cuda(), None).cpu()
    torch.testing.assert_close(actual, expected, rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("kind", ["batched", "grouped"])
def test_blockwise_expert_ops_run_in_a_cuda_graph(kind):
    """No host sync on the CUDA path: the op is captured in a CUDA graph and its replay on new routing
    (written into the captured tensors) equals the reference; rows past the groups are 0."""
    torch.manual_seed(0)
    w_q, w_scale = (t.cuda() for t in quantize_fp8_blockwise_weight(torch.randn(8, 256, 256) / 16, (128, 128)))
    x = torch.randn(16, 256, dtype=torch.bfloat16, device="cuda")
    if kind == "batched":
        op, rows, new_rows = torch.ops.fxquant.fp8_blockwise_batched_mm, torch.randint(0, 8, (16,)), torch.randint(0, 8, (16,))
    else:
        op = torch.ops.fxquant.fp8_blockwise_grouped_mm
        rows = torch.tensor([2, 2, 4, 8, 8, 10, 14, 16], dtype=torch.int32)
        new_rows = torch.tensor([0, 3, 3, 3, 9, 9, 12, 15], dtype=torch.int32)
    rows = rows.cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        op(x, w_q, w_scale, rows, None)  # warm up (the Triton kernel compiled) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(x, w_q, w_scale, rows, None)
    rows.copy_(new_rows.cuda())
    graph.replay()
    expected = op(x.cpu(), w_q.cpu(), w_scale.cpu(), new_rows, None)
    torch.testing.assert_close(out.cpu(), expected, rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("kind", ["batched", "grouped"])
def test_compiled_blockwise_expert_ops_run_the_grouped_gemm_and_match_the_cpu_reference(kind):
    """SiLU·mul then the expert op, compiled by fxquant's backend on CUDA: the code calls the grouped GEMM
    op (its Triton kernel), not the expert op, and the output matches the CPU reference op on the same
    inputs. The fused SiLU·mul may round an activation to the neighbouring bf16 value and so flip its
    e4m3 code, hence a relative error rather than an elementwise bound."""
    torch.manual_seed(0)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(8, 256, 256) / 16, (128, 128))
    gate_up = torch.randn(100, 512, dtype=torch.bfloat16)
    op, rows = expert_op(kind)

    def down(gate_up, w_q, w_scale, rows):
        gate, up = gate_up.chunk(2, dim=-1)
        return op(torch.nn.functional.silu(gate) * up, w_q, w_scale, rows, None)

    expected = down(gate_up, w_q, w_scale, rows)
    compiled = torch.compile(down, backend=fxquant.backend(scheme="fp8_blockwise"))
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        out, (code, *_) = run_and_get_code(compiled, *(t.cuda() for t in (gate_up, w_q, w_scale, rows)))
    assert "fp8_blockwise_grouped_gemm.default(" in code and f"fp8_blockwise_{kind}_mm.default(" not in code, code
    assert relative_error(out.cpu(), expected) < 1e-2


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_compiled_qwen3_moe_under_fp8_blockwise_matches_the_cpu_reference(implementation):
    """A tiny bf16 Qwen3-MoE (64 x 64 blocks: its expert width is 64) compiled on CUDA runs the grouped
    GEMM op for its experts and matches the same model compiled for the CPU (the reference ops)."""
    from tests.kernels.test_cuda_experts import tiny_qwen3_moe

    config = fxquant.QuantConfig(scheme="fp8_blockwise", weight_block_size=(64, 64))
    model = tiny_qwen3_moe(implementation)
    tokens = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        cpu = torch.compile(model, backend=fxquant.backend(config))(tokens).logits.float()
        torch._dynamo.reset()
        model.cuda()
        with torch._inductor.config.patch(force_disable_caches=True):
            out, codes = run_and_get_code(torch.compile(model, backend=fxquant.backend(config)), tokens.cuda())
    code = "\n".join(codes)
    assert "fp8_blockwise_grouped_gemm.default(" in code, code
    assert "fp8_blockwise_batched_mm.default(" not in code and "fp8_blockwise_grouped_mm.default(" not in code
    assert relative_error(out.logits.float().cpu(), cpu) < 0.05


def test_a_deepseek_v3_fp8_checkpoint_loads_onto_the_gpu(tmp_path):
    from tests.moe_models import build, deepseek_v3_config
    from tests.test_deepseek_fp8_checkpoint import EXPERTS, reference_linear, write_deepseek_checkpoint

    tensors = write_deepseek_checkpoint(build(deepseek_v3_config(kv_rope=64)), tmp_path)
    with fxquant.empty_weights():
        model = build(deepseek_v3_config(kv_rope=64), dtype=torch.bfloat16)
    fxquant.load_quantized(tmp_path, model, device="cuda")
    assert model.get_submodule(EXPERTS)._parameters["gate_up_proj"].device.type == "cuda"
    name = "model.layers.1.self_attn.q_b_proj"
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model.get_submodule(name)(x.cuda()).cpu()
    expected = reference_linear(x, tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"])
    torch.testing.assert_close(y.double(), expected.to(torch.bfloat16).double(), rtol=2**-7, atol=2e-3)
