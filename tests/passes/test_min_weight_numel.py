"""`min_weight_numel`'s boundary (passes/plan_linears.py): a weight of exactly that many elements is
quantized, one fewer is not; for every way a layer is written."""

import pytest
import torch

import fxquant
from fxquant import QuantConfig
from tests.models import MLP, Addmm, FunctionalLinear, MatmulOnWeight

# (model, input, the layer looked at, its weight's number of elements)
LAYERS = {
    "nn.Linear": (MLP, (4, 64), "up", 128 * 64),
    "F.linear": (FunctionalLinear, (4, 64), "w1", 64 * 64),
    "x @ W.t()": (MatmulOnWeight, (4, 64), "w", 64 * 64),
    "x @ V (stored [K, N])": (MatmulOnWeight, (4, 64), "v", 64 * 128),
    "torch.addmm": (Addmm, (4, 64), "weight", 64 * 64),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(("offset", "quantized"), [(-1, True), (0, True), (1, False)], ids=["numel-1", "numel", "numel+1"])
def test_a_weight_of_exactly_min_weight_numel_elements_is_quantized(kind, offset, quantized):
    model_class, shape, layer, numel = LAYERS[kind]
    config = QuantConfig(min_weight_numel=numel + offset)
    plan = fxquant.plan(model_class(), torch.randn(shape), config=config)
    (entry,) = [entry for entry in plan if entry.layer == layer]
    assert (entry.scheme is not None) == quantized, f"{kind}, min_weight_numel={numel + offset}: {entry.note!r}"
    if not quantized:
        assert entry.note == f"{numel} weights < min_weight_numel={numel + offset}"
