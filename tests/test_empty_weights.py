"""`empty_weights()` (fxquant/empty_weights.py): parameters on meta and buffers real, in the thread
inside the block only, for transformers' models as for plain modules."""

import threading

import pytest
import torch
from transformers import (
    BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from fxquant import empty_weights

MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)),
    "bert": lambda: BertModel(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_models_get_meta_parameters_and_their_real_buffers(name):
    reference = MODELS[name]()
    with empty_weights():
        model = MODELS[name]()
    assert [n for n, p in model.named_parameters()] == [n for n, p in reference.named_parameters()]
    for param_name, param in model.named_parameters():
        assert param.is_meta and type(param) is torch.nn.Parameter, param_name
        assert param.shape == reference.get_parameter(param_name).shape, param_name
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(reference.named_buffers()).keys()
    for buffer_name, buffer in reference.named_buffers():  # rotary inv_freq, position_ids, ...
        assert torch.equal(buffers[buffer_name], buffer), buffer_name


def test_another_threads_modules_keep_real_parameters():
    """One thread inside empty_weights, another creating a module meanwhile: only the first's go to meta."""
    inside, created = threading.Event(), threading.Event()
    made = {}

    def empty():
        with empty_weights():
            inside.set()
            assert created.wait(timeout=60)
            made["inside"] = torch.nn.Linear(16, 8)

    def other():
        assert inside.wait(timeout=60)
        made["other"] = torch.nn.Linear(16, 8)
        created.set()

    threads = [threading.Thread(target=empty), threading.Thread(target=other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert made["inside"].weight.is_meta and made["inside"].bias.is_meta
    assert not made["other"].weight.is_meta and not made["other"].bias.is_meta


def test_nothing_changes_after_the_block_even_when_it_raises():
    with pytest.raises(RuntimeError, match="inside"), empty_weights():
        raise RuntimeError("inside")
    with empty_weights(), empty_weights():  # nested: still meta, and both undone after
        assert torch.nn.Linear(4, 4).weight.is_meta
    linear = torch.nn.Linear(4, 4)
    assert not linear.weight.is_meta and linear.weight.requires_grad
