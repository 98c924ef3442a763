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
