"""Weight quantization (passes/quantize_weights.py): once per parameter, NaN/Inf errors name the layer."""

import pytest
import torch
import torch.nn as nn

import fxquant
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from tests.graphs import rewrite
from tests.models import MLP


class Tied(nn.Module):
    """One weight used by two layers (as tied embeddings are)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(64, 64, bias=False)
        self.second = nn.Linear(64, 64, bias=False)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_quantized_buffers_hold_the_reference_quantization():
    model = MLP()
    backend = fxquant.Backend(fxquant.QuantConfig(scheme="fp8_rowwise"), keep_graphs=True)
    torch.compile(model, backend=lambda gm, inputs: (backend.rewrite(gm), gm.forward)[1])(torch.randn(2, 64))
    gm = backend.graphs[0]
    w_q, w_scale = quantize_fp8_rowwise(model.up.weight.detach())
    assert torch.equal(gm.fxquant_up_weight.view(torch.uint8), w_q.view(torch.uint8))
    assert torch.equal(gm.fxquant_up_scale, w_scale)
    assert not hasattr(gm, "fxquant_lm_head_weight"), "a skipped layer gets no quantized copy"


def test_a_shared_weight_is_quantized_once():
    _, _, plan = rewrite(Tied(), torch.randn(2, 64))
    assert [entry.layer for entry in plan.rewritten] == ["first", "second"]
    assert plan[0].quantized is plan[1].quantized
    assert plan[0].quantized.layers == ["first", "second"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_is_an_error_naming_the_layer(bad):
    model = MLP()
    with torch.no_grad():
        model.down.weight[3, 5] = bad
    with pytest.raises(Exception, match=r"layer 'down': weight \(64, 128\) holds 1 NaN/Inf value"):
        torch.compile(model, backend="fxquant")(torch.randn(2, 64))


def test_a_nan_weight_in_a_skipped_layer_is_left_alone():
    model = MLP()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    out = torch.compile(model, backend="fxquant")(torch.randn(2, 64))
    assert torch.isnan(out).any() and not torch.isnan(out[:, 1:]).any()


def test_a_copy_on_another_device_is_replaced_not_requantized_into():
    """After `model.cuda()` a parameter keeps its identity but its cached copy lies on the old device:
    the new graph gets a new copy on the weight's device, the old graph keeps the old copy (pinned on
    the device test tests/kernels/test_cuda_experts.py, which compiles on the CPU, then on CUDA)."""
    from fxquant.passes.quantize_weights import QuantizedCache, QuantizedCopy, cache_key
    from fxquant.weight_stamp import WeightStamp

    model = MLP()
    cache = QuantizedCache()
    elsewhere = {"weight": torch.empty(128, 64, dtype=torch.float8_e4m3fn, device="meta"),
                 "weight_scale": torch.empty(128, device="meta")}
    old = QuantizedCopy(elsewhere, WeightStamp(torch.zeros(1)))
    cache[model.up.weight] = {cache_key("fp8_rowwise", False, fxquant.QuantConfig().options_for("fp8_rowwise")): old}
    with torch.no_grad():
        torch.compile(model, backend=lambda gm, inputs: (quantize_and_rewrite(gm, cache), gm.forward)[1])(torch.randn(2, 64))
    new = next(iter(cache[model.up.weight].values()))
    assert new is not old and new.tensors["weight"].device.type == "cpu"
    assert old.tensors["weight"].device.type == "meta", "the old copy was written into"


def quantize_and_rewrite(gm, cache):
    from fxquant.dynamo_params import dynamo_module_tensor
    from fxquant.pipeline import quantize_graph

    return quantize_graph(gm, dynamo_module_tensor, fxquant.QuantConfig(scheme="fp8_rowwise"), cache)
