"""Pattern matching (passes/find_sites.py) on aten-level graphs, and what must not match."""

import torch
import torch.nn as nn

from fxquant.passes import find_sites
from tests.models import MLP, Addmm, MatmulOnWeight


def exported_sites(model, *args):
    """Sites found in the torch.export graph, parameters looked up through the graph signature."""
    program = torch.export.export(model, args)
    names = program.graph_signature.inputs_to_parameters
    params = dict(model.named_parameters())

    def lookup(node):
        name = names.get(node.name) if node.op == "placeholder" else None
        return None if name is None else (name, params[name])

    return find_sites(program.graph_module, lookup)


def test_aten_linear_mm_addmm_and_kn_matmul_are_found():
    assert [(s.op, s.weight_name) for s in exported_sites(MLP(), torch.randn(2, 64))] == [
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


class KeywordMatmuls(nn.Module):
    """The linear spellings with keyword arguments, and transposes spelled as permute / swapaxes / .mT."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 64))

    def forward(self, x):
        return (
            torch.matmul(input=x, other=self.w.t())
            + torch.nn.functional.linear(input=x, weight=self.w)
            + x @ self.w.permute(1, 0)
            + x @ torch.swapaxes(self.w, 0, 1)
            + x @ self.w.mT
        )


def test_keyword_arguments_and_every_transpose_spelling_are_read():
    for sites in (exported_sites(KeywordMatmuls(), torch.randn(4, 64)), dynamo_sites(KeywordMatmuls(), torch.randn(4, 64))):
        assert [(s.kind, s.weight_name, s.weight_is_kn, s.out_features, s.in_features) for s in sites] == [
            ("linear", "w", False, 32, 64)
        ] * 5


def dynamo_sites(model, *args):
    """Sites found in the graph Dynamo captures (torch-level spellings)."""
    from fxquant.dynamo_params import dynamo_module_tensor

    found = []

    def capture(gm, example_inputs, **_):
        found.extend(find_sites(gm, dynamo_module_tensor))
        return gm.forward

    torch.compile(model, backend=capture, fullgraph=True)(*args)
    return found
