"""passes/quantize_before_gather.py: a grouped expert op on gathered rows reads the rows' source and
their indices. The rewrite is exact, so each model's output is bit for bit the one without it (the
ops' numerics against float64 are tests/passes/test_moe_models.py's and tests/ops'); what must not be
rewritten (rows read or changed elsewhere) is left as it was."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase
from torch._dynamo.utils import counters

import fxquant
from fxquant import QuantConfig
from tests.graphs import rewrite
from tests.models import MOE_MODELS
from tests.passes.test_moe_models import routing

TOP_K, EXPERTS, HIDDEN, WIDTH = 2, 8, 64, 32


class GroupedExperts(nn.Module):
    """transformers' grouped_mm experts forward, reduced (bf16, torch's grouped GEMM): the rows gathered
    by expert, then `after_gather(rows, weights)`; 5.17 zeroes expert-parallel sentinel rows there in place."""

    def __init__(self, after_gather=None, gather=lambda hidden, rows: hidden[rows]):
        super().__init__()
        torch.manual_seed(0)
        self.gate_up_proj = nn.Parameter((torch.randn(EXPERTS, 2 * WIDTH, HIDDEN) / HIDDEN**0.5).bfloat16())
        self.down_proj = nn.Parameter((torch.randn(EXPERTS, HIDDEN, WIDTH) / WIDTH**0.5).bfloat16())
        self.after_gather, self.gather = after_gather, gather

    def forward(self, hidden, index, weights):
        expert_ids, perm = torch.sort(index.reshape(-1))
        rows = self.gather(hidden, perm // TOP_K)
        weights = weights.reshape(-1)[perm]
        counts = torch.histc(expert_ids.float(), bins=EXPERTS, min=0, max=EXPERTS - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        extra = self.after_gather(rows, expert_ids, weights) if self.after_gather else None
        gate, up = torch._grouped_mm(rows.to(torch.bfloat16), self.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, -1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets) * weights.unsqueeze(-1)
        out = torch.zeros_like(y).index_copy(0, perm, y).view(-1, TOP_K, HIDDEN).sum(1)
        return out if extra is None else (out, extra)


def sentinels_zeroed(rows, expert_ids, weights):
    """transformers 5.17: the rows of sentinel experts (ids >= E, sorted last) zeroed in place."""
    rows.masked_fill_((expert_ids >= EXPERTS).unsqueeze(-1), 0.0)


def light_rows_zeroed(rows, expert_ids, weights):
    """Rows inside the groups zeroed in place: the zeros must reach the op's output."""
    rows.masked_fill_((weights < 0.4).unsqueeze(-1), 0.0)


def routed(sentinel: bool = False):
    hidden, index, weights = routing()
    if sentinel:  # an expert-parallel sentinel: an id past the experts, dropped by histc
        index[0, 0] = EXPERTS
    return hidden.bfloat16(), index, weights.bfloat16()


def without_the_pass(monkeypatch, model, *inputs):
    with monkeypatch.context() as patch:
        patch.setattr(fxquant.pipeline, "quantize_before_gathers", lambda gm: None)
        torch._dynamo.reset()
        return rewrite(model, *inputs)


@pytest.mark.parametrize("after_gather, sentinel", [(None, False), (sentinels_zeroed, True), (light_rows_zeroed, False)])
def test_the_rewrite_is_exact(monkeypatch, after_gather, sentinel):
    model, inputs = GroupedExperts(after_gather), routed(sentinel)
    _, unrewritten, _ = without_the_pass(monkeypatch, model, *inputs)
    torch._dynamo.reset()
    counters.clear()
    code, output, _ = rewrite(model, *inputs)
    assert counters["fxquant"]["quantized_before_gather"] == 1
    assert "fp8_rowwise_grouped_mm.default(l_hidden_, " in code and ".masked_fill_(" not in code
    assert torch.equal(output, unrewritten)


@pytest.mark.parametrize("gather", [lambda h, rows: h.index_select(0, rows), lambda h, rows: torch.index_select(h, 0, rows)])
def test_index_select_is_a_gather_too(monkeypatch, gather):
    model, inputs = GroupedExperts(gather=gather), routed()
    _, unrewritten, _ = without_the_pass(monkeypatch, model, *inputs)
    torch._dynamo.reset()
    counters.clear()
    _, output, _ = rewrite(model, *inputs)
    assert counters["fxquant"]["quantized_before_gather"] == 1
    assert torch.equal(output, unrewritten)


@pytest.mark.parametrize("after_gather", [lambda rows, ids, w: rows.sum(), lambda rows, ids, w: rows.mul_(2)])
def test_rows_read_or_changed_elsewhere_are_left_gathered(monkeypatch, after_gather):
    model, inputs = GroupedExperts(after_gather), routed()
    _, unrewritten, _ = without_the_pass(monkeypatch, model, *inputs)
    torch._dynamo.reset()
    counters.clear()
    code, output, _ = rewrite(model, *inputs)
    assert counters["fxquant"]["quantized_before_gather"] == 0
    assert "fp8_rowwise_grouped_mm.default(to, " in code
    torch.testing.assert_close(output, unrewritten, rtol=0, atol=0)


def test_an_exported_program_reads_the_tokens_and_their_rows():
    """aten level: rows = aten.index.Tensor(hidden, [perm // k]); the program's op reads hidden and the rows."""
    experts = MOE_MODELS["qwen3_moe"]("grouped_mm", layers=1).model.layers[0].mlp.experts
    inputs = routing()
    program = fxquant.export(experts, inputs, config=QuantConfig(scheme="fp8_rowwise"))
    (op,) = [n for n in program.graph.nodes if n.target is torch.ops.fxquant.fp8_rowwise_grouped_mm.default
             and n.args[0].op == "placeholder"]
    assert op.args[0].name == "hidden_states" and op.kwargs["rows"].target is torch.ops.aten.floor_divide.default
    _, expected, _ = rewrite(experts, *inputs)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*inputs), expected, rtol=0, atol=0)


class SentinelGraphTest(TestCase):
    def test_golden_graph(self):
        """5.17's in-place zeroing of sentinel rows becomes the same zeroing of the op's output rows."""
        code, _, _ = rewrite(GroupedExperts(sentinels_zeroed), *routed(sentinel=True))
        self.assertExpectedInline(code, """\
def forward(self, L_index_, L_hidden_, L_weights_, gate_up_proj_, down_proj_):
    reshape = l_index_.reshape(-1)
    sort = torch.sort(reshape)
    expert_ids = sort[0]
    perm = sort[1]
    floordiv = perm // 2
    reshape_1 = l_weights_.reshape(-1)
    weights = reshape_1[perm]
    float_1 = expert_ids.float()
    counts = torch.histc(float_1, bins = 8, min = 0, max = 7)
    offsets = torch.cumsum(counts, dim = 0, dtype = torch.int32)
    ge = expert_ids >= 8
    unsqueeze = ge.unsqueeze(-1)
    fxquant_gate_up_proj_weight = self.fxquant_gate_up_proj_weight
    fxquant_gate_up_proj_scale = self.fxquant_gate_up_proj_scale
    fp8_rowwise_grouped_mm_default_2 = torch.ops.fxquant.fp8_rowwise_grouped_mm.default(l_hidden_, fxquant_gate_up_proj_weight, fxquant_gate_up_proj_scale, offsets, None, rows = floordiv)
    masked_fill_scalar = torch.ops.aten.masked_fill.Scalar(fp8_rowwise_grouped_mm_default_2, unsqueeze, 0.0)
    chunk = masked_fill_scalar.chunk(2, -1)
    gate = chunk[0]
    up = chunk[1]
    silu = torch.nn.functional.silu(gate)
    mul = silu * up
    fxquant_down_proj_weight = self.fxquant_down_proj_weight
    fxquant_down_proj_scale = self.fxquant_down_proj_scale
    fp8_rowwise_grouped_mm_default_1 = torch.ops.fxquant.fp8_rowwise_grouped_mm.default(mul, fxquant_down_proj_weight, fxquant_down_proj_scale, offsets, None)
    unsqueeze_1 = weights.unsqueeze(-1)
    y = fp8_rowwise_grouped_mm_default_1 * unsqueeze_1
    zeros_like = torch.zeros_like(y)
    index_copy = zeros_like.index_copy(0, perm, y)
    view = index_copy.view(-1, 2, 64)
    out = view.sum(1)
    return (out,)""")
