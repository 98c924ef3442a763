"""Expert GEMM sites (passes/find_sites.py): batched (bmm on gathered expert weights) and grouped
(`_grouped_mm` with offsets), found in each spelling transformers and users write, planned one row
per expert tensor, rewritten into fp8_rowwise's expert ops, and checked against a float64 reference
of the same quantized math written from the formulas (tests/ops/formula_reference.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase

import fxquant
from fxquant import QuantConfig
from fxquant.passes import find_sites
from fxquant.passes.plan_linears import ROUTER_NOTE
from tests.graphs import rewrite
from tests.ops.formula_reference import quantize_fp8

E, N, K, S = 4, 32, 48, 10
# Each expert's weight [N, K] seen through the spellings of a transpose of the last two dims.
VIEWS = {
    "transpose(-2, -1)": lambda w: w.transpose(-2, -1),
    "transpose(1, 2)": lambda w: w.transpose(1, 2),
    "mT": lambda w: w.mT,
    "permute(0, 2, 1)": lambda w: w.permute(0, 2, 1),
    "swapaxes(1, 2)": lambda w: torch.swapaxes(w, 1, 2),
}
GROUPED = {"torch._grouped_mm": torch._grouped_mm, "F.grouped_mm": F.grouped_mm}


class GroupedExperts(nn.Module):
    """transformers' grouped_mm experts: rows sorted by expert, one GEMM per group. `view` None: the
    parameter is stored [E, K, N] and used as it is (gpt-oss)."""

    def __init__(self, view=VIEWS["transpose(-2, -1)"], grouped_mm=torch._grouped_mm):
        super().__init__()
        self.view, self.grouped_mm = view, grouped_mm
        shape = (E, N, K) if view is not None else (E, K, N)
        self.weight = nn.Parameter(torch.randn(shape) / K**0.5)

    def forward(self, x, offsets):
        weight = self.view(self.weight) if self.view is not None else self.weight
        return self.grouped_mm(x, weight, offs=offsets)


class BatchedExperts(nn.Module):
    """transformers' batched_mm experts: each row times its own expert's gathered weight."""

    def __init__(self, transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        self.weight = nn.Parameter(torch.randn((E, K, N) if transposed else (E, N, K)) / K**0.5)

    def forward(self, x, ids):
        if self.transposed:
            return torch.bmm(x.unsqueeze(1), self.weight[ids]).squeeze(1)
        return torch.bmm(self.weight[ids], x.unsqueeze(-1)).squeeze(-1)


def expert_weight(model) -> torch.Tensor:
    """The model's expert weight as [E, N, K]."""
    w = model.weight.detach()
    return w.transpose(1, 2) if (getattr(model, "view", 0) is None or getattr(model, "transposed", False)) else w


def reference(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """float64: row s of e4m3(x) (per-row scale) times e4m3(weight[experts[s]]) (per expert and output
    channel scale), rescaled; a row with expert -1 is zero."""
    _, x_values, x_scale = quantize_fp8(x, dims=(-1,))
    _, w_values, w_scale = quantize_fp8(weight, dims=(-1,))  # [E, N, K] values, [E, N, 1] scales
    hit = experts.clamp(min=0)
    y = torch.einsum("sk,snk->sn", x_values, w_values[hit]) * x_scale * w_scale[hit].squeeze(-1)
    return torch.where((experts >= 0).unsqueeze(-1), y, torch.zeros_like(y))


def group_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each row for group ends `offsets` (-1 past the last group)."""
    experts = torch.full((rows,), -1, dtype=torch.int64)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        experts[start:end] = expert
        start = end
    return experts


OFFSETS = torch.tensor([3, 3, 7, 9], dtype=torch.int32)  # expert 1 gets no rows, row 9 none
BF16 = torch.bfloat16  # grouped_mm traces in bf16 only
BF16_ROUNDING = {"rtol": 2**-8, "atol": 1e-3}  # the float32 result and the reference each rounded to bf16


@pytest.mark.parametrize("view", [*VIEWS, "stored [E, K, N]"])
@pytest.mark.parametrize("function", GROUPED)
def test_grouped_sites_in_every_spelling_match_the_reference(view, function):
    torch.manual_seed(0)
    model = GroupedExperts(VIEWS.get(view), GROUPED[function]).to(BF16)
    x = torch.randn(S, K, dtype=BF16)
    code, output, plan = rewrite(model, x, OFFSETS)
    (entry,) = plan
    assert (entry.site.kind, entry.shape, entry.scheme) == ("grouped", f"{E} x {N} x {K}", "fp8_rowwise")
    assert "grouped_mm(" not in code.replace("fp8_rowwise_grouped_mm", ""), code
    expected = reference(x, expert_weight(model), group_experts(OFFSETS, S))
    torch.testing.assert_close(output.double(), expected.to(BF16).double(), **BF16_ROUNDING)


@pytest.mark.parametrize("transposed", [False, True], ids=["W[ids] @ x", "x @ V[ids]"])
def test_batched_sites_match_the_reference(transposed):
    torch.manual_seed(0)
    model = BatchedExperts(transposed)
    x, ids = torch.randn(S, K), torch.tensor([0, 3, 3, 1, 0, 2, 2, 2, 1, 3])
    code, output, plan = rewrite(model, x, ids)
    (entry,) = plan
    assert (entry.site.kind, entry.site.op, entry.shape) == ("batched", "bmm", f"{E} x {N} x {K}")
    assert "bmm" not in code.replace("batched_mm", ""), code
    torch.testing.assert_close(output.double(), reference(x, expert_weight(model), ids), rtol=1e-5, atol=1e-5)


class ExpertGraphsTest(TestCase):
    def test_golden_graphs(self):
        torch.manual_seed(0)
        code, _, _ = rewrite(GroupedExperts().to(BF16), torch.randn(S, K, dtype=BF16), OFFSETS)
        self.assertExpectedInline(code, """\
def forward(self, weight_, L_x_, L_offsets_):
    fxquant_weight_weight = self.fxquant_weight_weight
    fxquant_weight_scale = self.fxquant_weight_scale
    fp8_rowwise_grouped_mm_default = torch.ops.fxquant.fp8_rowwise_grouped_mm.default(l_x_, fxquant_weight_weight, fxquant_weight_scale, l_offsets_, None)
    return (fp8_rowwise_grouped_mm_default,)""")
        code, _, _ = rewrite(BatchedExperts(), torch.randn(S, K), torch.zeros(S, dtype=torch.int64))
        self.assertExpectedInline(code, """\
def forward(self, weight_, L_ids_, L_x_):
    unsqueeze = l_x_.unsqueeze(-1)
    fxquant_weight_weight = self.fxquant_weight_weight
    fxquant_weight_scale = self.fxquant_weight_scale
    squeeze_dim = torch.ops.aten.squeeze.dim(unsqueeze, 2)
    fp8_rowwise_batched_mm_default = torch.ops.fxquant.fp8_rowwise_batched_mm.default(squeeze_dim, fxquant_weight_weight, fxquant_weight_scale, l_ids_, None)
    unsqueeze_default = torch.ops.aten.unsqueeze.default(fp8_rowwise_batched_mm_default, 2)
    squeeze = unsqueeze_default.squeeze(-1)
    return (squeeze,)""")


def test_a_scheme_without_an_expert_form_skips_the_expert_weights_with_its_reason():
    torch.manual_seed(0)
    _, output, plan = rewrite(GroupedExperts().to(BF16), torch.randn(S, K, dtype=BF16), OFFSETS, config=QuantConfig(scheme="int8"))
    (entry,) = plan
    assert entry.scheme is None and entry.note == "int8 has no grouped form for expert weights"
    assert "0 of 0 linear layers and 0 of 1 expert weights quantized" in str(plan)


def test_find_sites_reads_the_weight_operand_not_any_3d_tensor():
    """A 3-D parameter times an activation without a gather or offsets is not an expert site, nor is a
    gathered activation or a gather by a boolean mask."""

    class NotExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(E, N, K))

        def forward(self, x, ids):
            plain = torch.bmm(self.weight, x.reshape(E, K, -1))  # one weight per batch entry, no gather
            masked = self.weight[ids > 1]  # a boolean gather
            return plain.sum() + masked.sum() + torch.bmm(x[ids].unsqueeze(1), x[ids].unsqueeze(-1)).sum()

    program = torch.export.export(NotExperts(), (torch.randn(E * 2, K), torch.tensor([0, 1, 2, 3])))
    names = program.graph_signature.inputs_to_parameters
    lookup = lambda node: (names[node.name], program.state_dict[names[node.name]]) if node.name in names else None  # noqa: E731
    assert find_sites(program.graph_module, lookup) == []


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_qwen3_moe_experts_are_planned_and_run_under_inductor(implementation):
    """A tiny Qwen3-MoE: one plan row per expert tensor, the router skipped with its reason, compiled
    through Inductor (CPU) within FP8's error of the float model; both implementations agree."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    )
    config._experts_implementation = implementation
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    tokens = torch.randint(0, 64, (2, 5))
    backend = fxquant.backend(scheme="fp8_rowwise")  # auto is int8 on the CPU, which has no expert form
    with torch.no_grad():
        expected = model(tokens).logits
        actual = torch.compile(model, backend=backend)(tokens).logits
    rows = {row.layer: row for row in backend.plans[0]}
    up = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert (up.kind, up.shape, up.scheme) == (implementation.removesuffix("_mm"), "8 x 64 x 64", "fp8_rowwise")
    assert rows["model.layers.1.mlp.experts.down_proj"].shape == "8 x 64 x 32"
    assert rows["model.layers.0.mlp.gate"].note == ROUTER_NOTE
    assert str(backend.plans[0]).endswith("8 of 11 linear layers and 4 of 4 expert weights quantized")
    error = ((actual - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.08


def test_exported_expert_weights_leave_the_program():
    torch.manual_seed(0)
    model = GroupedExperts().to(BF16)
    x = torch.randn(S, K, dtype=BF16)
    program = fxquant.export(model, (x, OFFSETS), config=QuantConfig(scheme="fp8_rowwise"))
    assert "weight" not in program.state_dict and program.state_dict["fxquant_weight_weight"].shape == (E, N, K)
    expected = reference(x, expert_weight(model), group_experts(OFFSETS, S))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, OFFSETS).double(), expected.to(BF16).double(), **BF16_ROUNDING)
