"""`fxquant.quantize_` on a CUDA model (gpu marker): the layers' float weights leave the GPU, the
compiled quantized model computes what compiling the float model gives, and it runs eagerly."""

import copy

import pytest
import torch

import fxquant
from tests.models import relative_error, tiny_llama

pytestmark = pytest.mark.gpu


def test_quantize_in_place_on_cuda_frees_the_float_weights_and_compiles_to_the_float_models_outputs():
    model = tiny_llama().to("cuda", torch.bfloat16)
    quantized = copy.deepcopy(model)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    linear_bytes = sum(m.weight.nbytes for m in quantized.model.layers.modules() if isinstance(m, torch.nn.Linear))
    plan = fxquant.quantize_(quantized)
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    # bf16 → e4m3 halves each quantized weight; the float32 row scales take back 4 bytes per row.
    assert freed >= 0.3 * linear_bytes, f"quantize_ freed {freed} of {linear_bytes} bytes of layer weights"
    assert all(entry.layer != "lm_head" for entry in plan.rewritten)
    tokens = torch.randint(0, 64, (2, 7), device="cuda")
    with torch.no_grad():
        expected = torch.compile(model, backend="fxquant")(tokens).logits.float()
        torch._dynamo.reset()
        actual = torch.compile(quantized, backend="fxquant")(tokens).logits.float()
        eager = quantized(tokens).logits.float()
    assert relative_error(actual, expected) < 1e-2
    assert relative_error(eager, expected) < 2e-2
