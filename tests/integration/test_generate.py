"""HF generation through fxquant (issue 15 item 8), on a 2-layer tiny Llama.

`generate` is not `forward`: `torch.compile(model, backend="fxquant").generate(...)` compiles nothing
(the OptimizedModule hands `generate` to the original module, which calls itself uncompiled).
The two ways that work, and what each quantizes:
    generation_config.compile_config = CompileConfig(backend="fxquant"), static cache: the decode steps
    model.forward = torch.compile(model.forward, backend="fxquant"):                the prefill and the decode steps
Each is checked against the same generation with every layer but lm_head replaced by fxquant's op on
its weight's quantized copy (forward hooks, no compile): its tokens, and its logits to a tolerance
that compiled float arithmetic (Inductor's RMSNorm and attention) stays within while the float
model's logits do not.
"""

import contextlib

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from transformers import CompileConfig

import fxquant
from fxquant.ops.int8 import quantize_int8_rowwise
from tests.models import tiny_llama

pytestmark = pytest.mark.slow

LAYERS = 14  # 2 x (q, k, v, o, gate, up, down); lm_head is skipped by default
AUTO_OP = "int8_linear"  # what the default scheme, auto, runs on the CPU
NEW_TOKENS = 3
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def eager_quantized(model: nn.Module, decode_only: bool = False):
    """Every nn.Linear but lm_head runs fxquant's op on its quantized weight; with `decode_only`, only
    in one-token forwards (what generate's compiled decode steps cover)."""

    def quantized(layer, inputs, output):
        if decode_only and inputs[0].shape[-2] != 1:
            return output
        w_q, w_scale = quantize_int8_rowwise(layer.weight.detach())
        return torch.ops.fxquant.int8_linear(inputs[0], w_q, w_scale, layer.bias)

    hooks = [m.register_forward_hook(quantized) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name != "lm_head"]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def generate(model: nn.Module, ids: torch.Tensor, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def assert_quantized_generation(actual, reference, float_run):
    """Tokens equal the eager quantized reference's; logits close to it, and farther from the float model's."""
    (tokens, logits), (expected_tokens, expected_logits), (_, float_logits) = actual, reference, float_run
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)
    assert (float_logits - expected_logits)[1:].abs().max() > 10 * TOLERANCE["atol"]  # decode steps quantized (int8: 28x)


def static_cache_compile_config(backend) -> CompileConfig:
    config = CompileConfig(backend=backend, mode=None)
    config._compile_all_devices = True  # transformers compiles generate's decode on accelerators only, unless told
    return config


@pytest.mark.parametrize("backend_kind", ["name", "object"])
def test_compile_config_with_a_static_cache_quantizes_the_decode_steps(backend_kind):
    model, ids = tiny_llama(), torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    float_run = generate(model, ids, cache_implementation="static")
    with eager_quantized(model, decode_only=True):
        reference = generate(model, ids, cache_implementation="static")

    backend = "fxquant" if backend_kind == "name" else fxquant.Backend()
    model.generation_config.compile_config = static_cache_compile_config(backend)
    first = generate(model, ids, cache_implementation="static")
    second = generate(model, ids, cache_implementation="static")

    assert counters["fxquant"][AUTO_OP] == LAYERS
    assert counters["stats"]["unique_graphs"] == 1  # the second generate reuses the decode graph
    if backend_kind == "object":  # generate deep-copies its config; the backend stays the user's
        (plan,) = backend.plans
        assert len(plan.rewritten) == LAYERS and [e.layer for e in plan.skipped] == ["lm_head"]
    assert_quantized_generation(first, reference, float_run)
    assert torch.equal(second[0], first[0])


def test_compiled_forward_quantizes_prefill_and_decode():
    model, ids = tiny_llama(), torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    float_run = generate(model, ids)
    with eager_quantized(model):
        reference = generate(model, ids)

    backend = fxquant.Backend()
    model.forward = torch.compile(model.forward, backend=backend)
    actual = generate(model, ids)

    assert len(backend.plans) >= 2  # the prefill's graph and the decode's (static, then dynamic)
    assert all(len(plan.rewritten) == LAYERS for plan in backend.plans)
    assert counters["fxquant"][AUTO_OP] == LAYERS * len(backend.plans)
    assert_quantized_generation(actual, reference, float_run)


def test_compiling_the_module_leaves_generate_uncompiled():
    """Pins the limitation the README warns about: nothing is compiled, so nothing is quantized."""
    model, ids = tiny_llama(), torch.randint(0, 128, (1, 6))
    backend = fxquant.Backend()
    compiled = torch.compile(model, backend=backend)
    tokens, _ = generate(compiled, ids)
    assert backend.plans == [] and counters["stats"]["unique_graphs"] == 0
    assert torch.equal(tokens, generate(model, ids)[0])
