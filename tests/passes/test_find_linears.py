"""Pattern matching (passes/find_linears.py) on aten-level graphs, and what must not match."""

import torch
import torch.nn as nn

from fxquant.passes import find_linears
from tests.models import MLP, Addmm, MatmulOnWeight


def exported_sites(model, *args):
    """Sites found in the torch.export graph, parameters looked up through the graph signature."""
    program = torch.export.export(model, args)
    names = program.graph_signature.inputs_to_parameters
    params = dict(model.named_parameters())

    def lookup(node):
        name = names.get(node.name) if node.op == "placeholder" else None
        return None if name is None else (name, params[name])

    return find_linears(program.graph_module, lookup)


def test_aten_linear_mm_addmm_and_kn_matmul_are_found():
    assert [(s.kind, s.weight_name) for s in exported_sites(MLP(), torch.randn(2, 64))] == [
        ("linear", "up.weight"), ("linear", "down.weight"), ("linear", "lm_head.weight")
    ]
    sites = exported_sites(MatmulOnWeight(), torch.randn(3, 64))
    assert [(s.weight_name, s.weight_is_kn, s.out_features, s.in_features) for s in sites] == [
        ("w", False, 64, 64), ("v", True, 128, 64)
    ]
    (site,) = exported_sites(Addmm(), torch.randn(4, 64))
    assert site.bias is not None and site.weight_name == "weight"


class NotLinear(nn.Module):
    """Matmuls that are not linear layers: activation @ activation, a scaled addmm, a 3-D parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64))
        self.bias = nn.Parameter(torch.randn(64))
        self.batched = nn.Parameter(torch.randn(2, 64, 64))

    def forward(self, x):
        scores = x @ x.t()
        scaled = torch.addmm(self.bias, x, self.weight.t(), beta=0.5)
        return scores.sum() + scaled.sum() + (x @ self.batched).sum()


def test_non_linear_matmuls_are_not_matched():
    assert exported_sites(NotLinear(), torch.randn(4, 64)) == []
