"""fp8_blockwise expert ops and DeepSeek-V3-format checkpoints on CUDA (gpu marker): the ops' CUDA run
(grouped: fxquant's blockwise grouped Triton kernel; batched: the reference implementation on the
device) equals their CPU run, and a
finegrained_fp8 checkpoint loads straight onto the GPU and runs its linear layers there."""

import pytest
import torch

import fxquant
from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["batched", "grouped"])
def test_blockwise_expert_ops_on_cuda_equal_the_cpu_reference(kind):
    torch.manual_seed(0)
    x = torch.randn(100, 256, dtype=torch.bfloat16)
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(8, 256, 256), (128, 128))
    if kind == "batched":
        op, rows = torch.ops.fxquant.fp8_blockwise_batched_mm, torch.randint(0, 8, (100,))
    else:
        op, rows = torch.ops.fxquant.fp8_blockwise_grouped_mm, torch.tensor([5, 5, 32, 50, 51, 70, 98, 98], dtype=torch.int32)
    expected = op(x, w_q, w_scale, rows, None)
    actual = op(x.cuda(), w_q.cuda(), w_scale.cuda(), rows.cuda(), None).cpu()
    torch.testing.assert_close(actual, expected, rtol=2**-8, atol=1e-3)


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
