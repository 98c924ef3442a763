"""The merge pass (passes/merge_parallel_linears.py): layers on one activation become one GEMM.

Merging only stacks weights along N, so the merged graph must compute exactly what the per-layer
graph does (bit for bit on the CPU reference), hold each quantized weight once, and follow weight
updates like any other compiled layer.
"""

import pytest
import torch
from expecttest import TestCase
from torch._dynamo.utils import counters

import fxquant
from fxquant import QuantConfig
from tests.graphs import rewrite


class ParallelProjections(torch.nn.Module):
    """q/k/v-like bias-free projections of one input (N = 64, 32, 32), a biased one beside them
    (runs alone), and one on another input (runs alone)."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(64, 64, bias=False)
        self.k = torch.nn.Linear(64, 32, bias=False)
        self.v = torch.nn.Linear(64, 32, bias=False)
        self.gate = torch.nn.Linear(64, 32)
        self.out = torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.q(x), self.k(x) * 2, self.v(x).relu(), self.gate(x), self.out(x.relu())


SCHEMES = {
    "fp8_rowwise": QuantConfig(scheme="fp8_rowwise"),
    "int8": QuantConfig(scheme="int8"),
    "fp8_blockwise": QuantConfig(scheme="fp8_blockwise", weight_block_size=(32, 32)),
}


def unmerged(config: QuantConfig) -> QuantConfig:
    return QuantConfig(**{**config.__dict__, "merge_parallel_linears": False})


class MergeParallelLinearsTest(TestCase):
    def setUp(self):
        torch.manual_seed(0)
        counters.clear()

    def test_qkv_become_one_gemm_and_a_split(self):
        code, _, plan = rewrite(ParallelProjections(), torch.randn(2, 5, 64), config=SCHEMES["fp8_rowwise"])
        self.assertExpectedInline(code, """\
def forward(self, q_weight_, L_x_, k_weight_, v_weight_, gate_weight_, gate_bias_, out_weight_):
    fxquant_q_merged_weight = self.fxquant_q_merged_weight
    fxquant_q_merged_scale = self.fxquant_q_merged_scale
    fp8_rowwise_linear_default_5 = torch.ops.fxquant.fp8_rowwise_linear.default(l_x_, fxquant_q_merged_weight, fxquant_q_merged_scale, None, None)
    split_with_sizes_default = torch.ops.aten.split_with_sizes.default(fp8_rowwise_linear_default_5, [64, 32, 32], -1)
    getitem = split_with_sizes_default[0]
    getitem_1 = split_with_sizes_default[1]
    getitem_2 = split_with_sizes_default[2]
    mul = getitem_1 * 2
    relu = getitem_2.relu()
    fxquant_gate_weight = self.fxquant_gate_weight
    fxquant_gate_scale = self.fxquant_gate_scale
    fp8_rowwise_linear_default_3 = torch.ops.fxquant.fp8_rowwise_linear.default(l_x_, fxquant_gate_weight, fxquant_gate_scale, gate_bias_, None)
    relu_1 = l_x_.relu()
    fxquant_out_weight = self.fxquant_out_weight
    fxquant_out_scale = self.fxquant_out_scale
    fp8_rowwise_linear_default_4 = torch.ops.fxquant.fp8_rowwise_linear.default(relu_1, fxquant_out_weight, fxquant_out_scale, None, None)
    return (getitem, mul, relu, fp8_rowwise_linear_default_3, fp8_rowwise_linear_default_4)""")
        self.assertEqual([entry.note for entry in plan], ["one GEMM with k, v", "one GEMM with q, v", "one GEMM with q, k", "", ""])
        self.assertEqual(counters["fxquant"]["merged_linears"], 3)

    def test_the_plan_table_shows_the_merge_before_anything_is_quantized(self):
        plan = fxquant.plan(ParallelProjections(), torch.randn(2, 64), config=SCHEMES["int8"])
        self.assertExpectedInline(str(plan), """\
layer  op      N x K    scheme  bytes                note
-----  ------  -------  ------  -------------------  ------------------
q      linear  64 x 64  int8    16.0 KiB -> 4.2 KiB  one GEMM with k, v
k      linear  32 x 64  int8    8.0 KiB -> 2.1 KiB   one GEMM with q, v
v      linear  32 x 64  int8    8.0 KiB -> 2.1 KiB   one GEMM with q, k
gate   linear  32 x 64  int8    8.0 KiB -> 2.1 KiB
out    linear  64 x 64  int8    16.0 KiB -> 4.2 KiB
weights of these layers: 56.0 KiB -> 14.9 KiB (0.27x)
5 of 5 linear layers quantized""")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_merged_graph_computes_what_the_per_layer_graph_does(scheme):
    torch.manual_seed(0)
    model, x = ParallelProjections(), torch.randn(2, 5, 64)
    _, merged, _ = rewrite(model, x, config=SCHEMES[scheme])
    _, per_layer, _ = rewrite(model, x, config=unmerged(SCHEMES[scheme]))
    for a, b in zip(merged, per_layer):
        assert torch.equal(a, b)


def test_tensorwise_scales_do_not_stack():
    counters.clear()
    rewrite(ParallelProjections(), torch.randn(2, 64), config=QuantConfig(scheme="fp8_tensorwise"))
    assert counters["fxquant"]["merged_linears"] == 0


def test_turned_off_by_the_config():
    counters.clear()
    code, _, _ = rewrite(ParallelProjections(), torch.randn(2, 64), config=unmerged(SCHEMES["int8"]))
    assert counters["fxquant"]["merged_linears"] == 0 and "split_with_sizes" not in code


def test_each_weight_is_held_once_across_graphs():
    """Members' quantized copies are views of the stacked buffer, and the dynamic graph Dynamo
    compiles next stacks the same views without a copy."""
    model = ParallelProjections()
    backend = fxquant.backend(scheme="fp8_rowwise", keep_graphs=True)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for tokens in (4, 9, 16):
            compiled(torch.randn(tokens, 64))
    first, second = backend.graphs
    stacked = first.fxquant_q_merged_weight
    q, k, v = (entry.quantized.tensors["weight"] for entry in backend.plans[0][:3])
    assert all(w.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr() for w in (q, k, v))
    assert [w.data_ptr() - stacked.data_ptr() for w in (q, k, v)] == [0, 64 * 64, 96 * 64]
    assert not hasattr(first, "fxquant_k_weight"), "the members' own buffers are gone"
    assert second.fxquant_q_merged_weight.data_ptr() == stacked.data_ptr()
    assert second.fxquant_q_merged_scale.data_ptr() == first.fxquant_q_merged_scale.data_ptr()


def test_in_place_update_of_a_member_reaches_the_stacked_gemm():
    torch.manual_seed(0)
    model, x = ParallelProjections(), torch.randn(4, 64)
    compiled = torch.compile(model, backend=fxquant.backend(scheme="int8"))
    with torch.no_grad():
        compiled(x)
        model.k.weight.mul_(3.0)
        actual = compiled(x)
        torch._dynamo.reset()
        expected = torch.compile(model, backend=fxquant.backend(unmerged(SCHEMES["int8"])))(x)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_exported_programs_keep_one_op_per_layer():
    program = fxquant.export(ParallelProjections(), (torch.randn(2, 64),), config=SCHEMES["fp8_rowwise"])
    code = program.graph_module.code
    assert code.count("fxquant.fp8_rowwise_linear") == 5 and "split_with_sizes" not in code


def test_a_weight_shared_by_two_layers_is_not_stacked():
    """Tied weights are quantized once for both layers; stacking would hold that copy twice."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(64, 64, bias=False)
            self.k = torch.nn.Linear(64, 64, bias=False)
            self.k.weight = self.q.weight

        def forward(self, x):
            return self.q(x), self.k(x).relu()

    counters.clear()
    code, _, plan = rewrite(Tied(), torch.randn(2, 64), config=SCHEMES["fp8_rowwise"])
    assert counters["fxquant"]["merged_linears"] == 0 and "split_with_sizes" not in code
    assert [entry.note for entry in plan] == ["", ""]
