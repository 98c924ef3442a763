"""Accuracy on real weights for the bitsandbytes family: all-MiniLM-L6-v2 sentence embeddings (the
40 sentences and the pooling of tests/integration/test_minilm.py), fp32 eager vs fxquant compiled.

nf4 and fp4 must be at least as good as bitsandbytes' own quantization of the same 37 linear layers
(`bitsandbytes.functional.quantize_4bit` with double quantization, then `dequantize_4bit`: what
Linear4bit multiplies by), computed here; llm_int8 (threshold 6) must reach 0.998.

Measured (torch 2.13 CPU, 2 cores): mean cosine nf4 0.97276 (bitsandbytes 0.97276), fp4 0.94378 (0.94378),
llm_int8 0.99919 (worst sentence 0.99773). The 4-bit figures are equal: the weights are bit-identical.
"""

import copy

import pytest
import torch

from tests.integration.test_minilm import embed, model_and_batch, tokenizer  # noqa: F401  (fixtures)

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

MIN_COSINE_LLM_INT8 = 0.998
SAME_WEIGHTS_SLACK = 1e-5  # the same dequantized weights; only the GEMMs' summation order differs


def mean_cosine(model, batch, reference) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(embed(model, batch), reference, dim=-1)
    return cosine.mean().item(), cosine.min().item()


def bitsandbytes_4bit(model, quant_type: str):
    """Every nn.Linear's weight replaced by bitsandbytes' own 4-bit round trip (blocks of 64, double quant)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            packed, state = bnb.functional.quantize_4bit(module.weight.data, blocksize=64, compress_statistics=True,
                                                         quant_type=quant_type)
            module.weight.data = bnb.functional.dequantize_4bit(packed, state)
    return model


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_4bit_is_as_good_as_bitsandbytes(model_and_batch, scheme):  # noqa: F811
    model, batch = model_and_batch
    reference = embed(model, batch)
    ours, ours_min = mean_cosine(torch.compile(copy.deepcopy(model), backend="fxquant", options={"scheme": scheme}), batch, reference)
    theirs, _ = mean_cosine(bitsandbytes_4bit(model, scheme), batch, reference)
    print(f"\nall-MiniLM-L6-v2 {scheme}: mean cosine {ours:.6f} (min {ours_min:.6f}), bitsandbytes {theirs:.6f}")
    assert ours >= theirs - SAME_WEIGHTS_SLACK, f"{scheme}: {ours:.6f} below bitsandbytes' {theirs:.6f}"
    assert ours < 0.9999, f"{scheme}: mean cosine {ours:.6f} is ~1: the model does not look quantized"


def test_llm_int8(model_and_batch):  # noqa: F811
    model, batch = model_and_batch
    reference = embed(model, batch)
    mean, worst = mean_cosine(torch.compile(copy.deepcopy(model), backend="fxquant", options={"scheme": "llm_int8"}), batch, reference)
    print(f"\nall-MiniLM-L6-v2 llm_int8: mean cosine {mean:.6f} (min {worst:.6f})")
    assert MIN_COSINE_LLM_INT8 <= mean < 0.999999
