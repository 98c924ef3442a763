"""Small models the tests share: an MLP, layers written with F.linear / matmul / addmm, a tiny Llama."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Two linear layers and an lm_head, the shape of a transformer's feed-forward block plus a head."""

    def __init__(self, dim: int = 64, hidden: int = 128, vocab: int = 32):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(self.down(F.gelu(self.up(x))))


class FunctionalLinear(nn.Module):
    """F.linear on raw parameters, with and without a bias."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.b1 = nn.Parameter(torch.randn(dim))
        self.w2 = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


class MatmulOnWeight(nn.Module):
    """`x @ W.t()` with W [N, K], and `x @ V` with V stored [K, N]."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.v = nn.Parameter(torch.randn(dim, 2 * dim) / dim**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.w.t()) @ self.v


class Addmm(nn.Module):
    """torch.addmm(bias, x, W.t()) on a 2-D activation, as older model code writes it."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight.t())


def tiny_llama_config(layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )


def tiny_llama(layers: int = 2, seed: int = 0):
    """A random-init LlamaForCausalLM (hidden 64, 4 heads, 2 KV heads), eval mode, fp32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(layers)).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


# Tiny MoE models of transformers 5: experts as 3-D parameters, run by `experts_implementation`
# ("eager": a loop over the experts hit; "batched_mm"; "grouped_mm"). 8 experts, top-2, hidden 64.
MOE_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _moe(model_class, config, implementation: str, seed: int):
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # transformers leaves some MoE parameters zero until loaded (routers' biases): fill them
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    return model


def tiny_qwen3_moe(implementation: str = "batched_mm", layers: int = 2, seed: int = 0):
    """Qwen3-MoE: experts gate_up_proj [8, 64, 64], down_proj [8, 64, 32]; router `mlp.gate` [8, 64]."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    )
    return _moe(Qwen3MoeForCausalLM, config, implementation, seed)


def tiny_mixtral(implementation: str = "batched_mm", layers: int = 2, seed: int = 0):
    """Mixtral: experts gate_up_proj [8, 64, 64], down_proj [8, 64, 32]; router `mlp.gate` [8, 64]."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
    )
    return _moe(MixtralForCausalLM, config, implementation, seed)


def tiny_deepseek_v3(implementation: str = "batched_mm", layers: int = 2, seed: int = 0):
    """DeepSeek-V3: layer 0 dense (first_k_dense_replace=1); later layers 8 routed experts (gate_up_proj
    [8, 64, 64], down_proj [8, 64, 32]), one shared expert (nn.Linear) and a sigmoid router with a
    grouped topk (`mlp.gate`, weight [8, 64] used as float32)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, n_group=2, topk_group=1,
    )
    return _moe(DeepseekV3ForCausalLM, config, implementation, seed)


def tiny_gpt_oss(implementation: str = "batched_mm", layers: int = 2, seed: int = 0):
    """gpt-oss: experts stored transposed, gate_up_proj [8, 64 (K), 64 (N)] and down_proj [8, 32, 64], with
    biases added after the matmul; router `mlp.router` [8, 64] with a bias; attention sinks."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
        sliding_window=8,
    )
    return _moe(GptOssForCausalLM, config, implementation, seed)


MOE_MODELS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "deepseek_v3": tiny_deepseek_v3, "gpt_oss": tiny_gpt_oss}
