"""Expert sites on CUDA (gpu marker): a tiny Qwen3-MoE in bf16 whose experts run through transformers'
batched_mm and grouped_mm implementations (on CUDA: torch's grouped GEMM, not the CPU fallback op)
compiles with fxquant, plans every expert tensor, and matches the same model's CPU reference ops."""

import pytest
import torch

import fxquant
from tests.models import relative_error

pytestmark = pytest.mark.gpu


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
    backend = fxquant.backend()
    with torch.no_grad():
        expected = model(tokens).logits.float()
        cpu = torch.compile(model, backend=fxquant.backend())(tokens).logits.float()  # on the CPU: the reference ops
        model.cuda()
        actual = torch.compile(model, backend=backend)(tokens.cuda()).logits.float().cpu()
    rows = {row.layer: row for row in backend.plans[0]}
    assert rows["model.layers.1.mlp.experts.gate_up_proj"].scheme == "fp8_rowwise"
    assert rows["model.layers.1.mlp.experts.down_proj"].shape == "8 x 128 x 64"
    print(backend.plans[0])
    assert relative_error(actual, cpu) < 0.02, "CUDA and the CPU reference ops differ beyond bf16 rounding"
    assert 0 < relative_error(actual, expected) < 0.08
