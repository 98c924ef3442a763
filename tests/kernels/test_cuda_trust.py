"""Issue 15's fixes on CUDA (gpu marker): weights changed through `.data` after compiling are
re-quantized there too, under CUDA graphs included; a loaded checkpoint runs eagerly with the
compiled model's numerics; autocast returns what eager autocast returns."""

import copy

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig, load_quantized, save_quantized
from tests.models import MLP

pytestmark = pytest.mark.gpu


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(dim=128, hidden=256, vocab=32).eval().cuda().to(torch.bfloat16)


UPDATES = {
    "data.mul_": lambda w: w.data.mul_(1.5),
    "data = t": lambda w: setattr(w, "data", torch.randn_like(w) / 16),
    "data.lerp_ (EMA)": lambda w: w.data.lerp_(torch.randn_like(w) / 16, 0.5),
}


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("update", list(UPDATES))
def test_an_update_through_data_is_requantized_on_cuda(mode, update):
    model, x = mlp(), torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, backend="fxquant", mode=mode)
    with torch.no_grad():
        before = compiled(x).clone()
        UPDATES[update](model.up.weight)
        after = compiled(x).clone()
        torch._dynamo.reset()
        fresh = torch.compile(copy.deepcopy(model), backend="fxquant", mode=mode)(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "fp8_blockwise", "int8"])
def test_a_loaded_checkpoint_runs_eagerly_as_compiled_on_cuda(tmp_path, scheme):
    model, x = mlp(), torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    save_quantized(model, tmp_path, QuantConfig(scheme=scheme))
    loaded = load_quantized(tmp_path, mlp(), device="cuda")
    with torch.no_grad():
        eager = loaded(x)
        compiled = torch.compile(loaded, backend="fxquant")(x)
    # The same ops and quantized weights; compiled fuses the quantization into its producer (bf16 GELU).
    torch.testing.assert_close(eager, compiled, rtol=2e-2, atol=2e-2)


def test_autocast_on_cuda_returns_eager_autocasts_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).cuda().eval()
    x = torch.randn(8, 128, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        eager = model(x)
        compiled = torch.compile(model, backend="fxquant")(x)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    assert ((compiled.float() - eager.float()).norm() / eager.float().norm()) < 0.1  # e4m3 quantization error
