"""Tiny transformers MoE models for the checkpoint tests: Qwen3-MoE, Mixtral, DeepSeek-V3 (dimensions
multiples of 128 where fp8_blockwise's 128 x 128 blocks must fit)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def qwen3_moe_config(width: int = 64, expert_width: int = 32, experts: int = 4):
    return transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=width, intermediate_size=2 * width, moe_intermediate_size=expert_width,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4,
        num_experts=experts, num_experts_per_tok=2,
    )


def mixtral_config(width: int = 64, expert_width: int = 128, experts: int = 4):
    return transformers.MixtralConfig(
        vocab_size=64, hidden_size=width, intermediate_size=expert_width, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
    )


def deepseek_v3_config(kv_rope: int = 128):
    """Layer 0 dense, layer 1 MoE (4 routed experts, 1 shared); every linear whole 128 x 128 blocks
    (kv_rope=64: kv_a_proj_with_mqa has N = 128 + 64, not whole blocks)."""
    return transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
        topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=kv_rope, v_head_dim=64,
    )


def build(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The config's causal LM with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0] if config.architectures else _causal_lm(config))
    return cls(config).to(dtype).eval()


def _causal_lm(config) -> str:
    return {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM"}[config.model_type]
