"""Decode on CUDA (gpu marker): HF `generate` with a static KV cache, its decode steps compiled by
generate itself with fxquant's backend under CUDA graphs (`mode="reduce-overhead"`), as
benchmarks/e2e_llama.py --decode runs it at Llama-3-8B size.

What issue 3 asks of decode: CUDA graphs are not skipped (the merged q/k/v and gate/up weights are
views of one buffer, the cache is updated in place), and no token recompiles.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import fxquant
from tests.models import tiny_llama_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch", [1, 4])
def test_static_cache_decode_under_cuda_graphs(batch):
    from transformers import CompileConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(tiny_llama_config(), dtype=torch.bfloat16).eval().cuda()
    ids = torch.randint(0, 128, (batch, 16), device="cuda")
    compile_config = CompileConfig(backend=fxquant.backend(scheme="fp8_rowwise"), mode="reduce-overhead", fullgraph=True)

    def generate():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=12, min_new_tokens=12,
            do_sample=False, cache_implementation="static", compile_config=compile_config)

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        first = generate()
        graphs = counters["stats"]["unique_graphs"]
        second = generate()
    assert first.shape == (batch, 16 + 12)
    assert torch.equal(first, second), "the same greedy decode twice"
    assert counters["stats"]["unique_graphs"] == graphs, "a second generate compiled again"
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were skipped"
    assert counters["fxquant"]["fp8_rowwise_linear"] > 0 and counters["fxquant"]["merged_linears"] > 0
