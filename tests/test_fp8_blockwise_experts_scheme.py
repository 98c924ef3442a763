"""fp8_blockwise's expert forms (fxquant/schemes/fp8_blockwise.py): expert weights planned as
fp8_blockwise, quantized once per expert and 128x128 block, rewritten into the batched and grouped
ops, against a float64 reference of the formula (tests/ops/test_fp8_blockwise_experts.py's)."""

import torch
import torch.nn as nn

from fxquant import QuantConfig
from tests.graphs import rewrite
from tests.ops.test_fp8_blockwise_experts import reference_rows

E, N, K = 3, 256, 128
CONFIG = QuantConfig(scheme="fp8_blockwise")


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, N, K) / K**0.5)

    def forward(self, x, ids=None, offsets=None):
        if offsets is not None:
            return torch._grouped_mm(x, self.weight.transpose(-2, -1), offs=offsets)
        return torch.bmm(self.weight[ids], x.unsqueeze(-1)).squeeze(-1)


def test_grouped_site_runs_the_blockwise_grouped_op():
    torch.manual_seed(0)
    model = Experts().to(torch.bfloat16)
    x, offsets = torch.randn(9, K, dtype=torch.bfloat16), torch.tensor([4, 4, 8], dtype=torch.int32)
    code, output, plan = rewrite(model, x, offsets=offsets, config=CONFIG)
    (entry,) = plan
    assert (entry.site.kind, entry.shape, entry.scheme) == ("grouped", f"{E} x {N} x {K}", "fp8_blockwise")
    assert "fp8_blockwise_grouped_mm.default(" in code
    assert entry.quantized.tensors["weight_scale"].shape == (E, 2, 1)  # one scale per expert and 128x128 block
    expected = reference_rows(x, model.weight.detach(), [0] * 4 + [2] * 4 + [-1], block=(128, 128))
    torch.testing.assert_close(output.double(), expected.to(torch.bfloat16).double(), rtol=2**-8, atol=1e-3)


def test_batched_site_runs_the_blockwise_batched_op():
    torch.manual_seed(1)
    model = Experts()
    x, ids = torch.randn(6, K), torch.tensor([2, 0, 1, 1, 2, 0])
    code, output, plan = rewrite(model, x, ids, config=CONFIG)
    (entry,) = plan
    assert (entry.site.kind, entry.scheme) == ("batched", "fp8_blockwise")
    assert "fp8_blockwise_batched_mm.default(" in code
    expected = reference_rows(x, model.weight.detach(), ids.tolist(), block=(128, 128))
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)


def test_expert_weights_not_whole_blocks_are_skipped_with_the_reason():
    model = Experts()
    model.weight = nn.Parameter(torch.randn(E, 64, K))
    _, _, plan = rewrite(model, torch.randn(4, K), torch.zeros(4, dtype=torch.long), config=CONFIG)
    assert plan[0].scheme is None and plan[0].note == "N=64 not a multiple of the 128-wide weight block"
