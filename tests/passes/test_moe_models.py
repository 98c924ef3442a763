"""Expert sites on tiny transformers MoE models (tests/models.py): Qwen3-MoE, Mixtral, DeepSeek-V3
(shared experts, a dense first layer, a float32 sigmoid router) and gpt-oss (experts transposed
[E, K, N], biases after the matmul), in each experts implementation that reaches a graph.

Numerics: each model's experts block, rewritten and run (the ops' CPU reference), against a float64
reference of the same quantized math written from the formulas (tests/ops/formula_reference.py):
per-row e4m3 activations, per-expert-and-channel e4m3 weights, the model's own gate between the two
matmuls in the activation dtype, rounded where the op rounds (its output in the activation dtype)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase
from torch._dynamo.utils import counters

import fxquant
from fxquant import QuantConfig
from fxquant.passes.plan_linears import ROUTER_NOTE
from tests.graphs import rewrite
from tests.models import MOE_MODELS, relative_error
from tests.ops.formula_reference import quantize_fp8

TOKENS, TOP_K, EXPERTS, HIDDEN = 6, 2, 8, 64


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """float64: row s of e4m3(x) (one scale per row) times e4m3(weight[experts[s]]) (weight [E, N, K], one
    scale per expert and output channel), the scales applied after the sum."""
    _, x_values, x_scale = quantize_fp8(x, dims=(-1,))
    _, w_values, w_scale = quantize_fp8(weight, dims=(-1,))
    return torch.einsum("sk,snk->sn", x_values, w_values[experts]) * x_scale * w_scale[experts].squeeze(-1)


def experts_reference(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The MoE experts block of `module` (a transformers Experts: gate_up_proj, down_proj, their biases
    where it has them, its `_apply_gate`), token by token and expert by expert, in float64 matmuls."""
    dtype = hidden.dtype
    gate_up, down = module.gate_up_proj.detach().double(), module.down_proj.detach().double()
    if module.is_transposed:  # gpt-oss holds [E, K, N]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    rows, experts = hidden.repeat_interleave(TOP_K, dim=0), index.reshape(-1)
    y = expert_matmul(rows, gate_up, experts).to(dtype)
    if module.has_bias:
        y = y + module.gate_up_proj_bias.detach()[experts]
    y = module._apply_gate(y)
    y = expert_matmul(y, down, experts).to(dtype)
    if module.has_bias:
        y = y + module.down_proj_bias.detach()[experts]
    return (y.double() * weights.reshape(-1, 1).double()).view(-1, TOP_K, y.shape[-1]).sum(1)


def routing(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(TOKENS)])
    return hidden, index, torch.rand(TOKENS, TOP_K, generator=generator)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("model", MOE_MODELS)
def test_each_models_experts_match_the_float64_reference(model, implementation):
    """float32 (grouped_mm traces as transformers' grouped_mm_fallback op outside bf16): the reference
    to float32 rounding; the float experts differ by FP8's error, so the check tells quantized from not."""
    experts = MOE_MODELS[model](implementation).model.layers[-1].mlp.experts
    hidden, index, weights = routing()
    counters.clear()
    _, output, plan = rewrite(experts, hidden, index, weights)
    kind = implementation.removesuffix("_mm")
    # grouped_mm: gate_up reads the tokens and their rows (passes/quantize_before_gather.py)
    assert counters["fxquant"]["quantized_before_gather"] == (kind == "grouped")
    assert [(row.layer, row.site.kind, row.shape, row.scheme) for row in plan] == [
        ("gate_up_proj", kind, "8 x 64 x 64", "fp8_rowwise"), ("down_proj", kind, f"8 x 64 x 32", "fp8_rowwise")]
    expected = experts_reference(experts, hidden, index, weights)
    assert relative_error(output, expected) < 1e-6
    with torch.no_grad():
        assert relative_error(experts(hidden, index, weights), expected) > 1e-3


def test_grouped_mm_in_bfloat16_matches_the_reference_rounded_as_the_model_rounds():
    """bf16: torch's own grouped_mm traced; the reference rounds each matmul's output and the gate to bf16
    as the model does, so the two differ where the float32 and float64 sums round to neighbouring bf16
    values and an intermediate then quantizes to the neighbouring e4m3 value (~1% of the output)."""
    experts = MOE_MODELS["qwen3_moe"]("grouped_mm").to(torch.bfloat16).model.layers[-1].mlp.experts
    hidden, index, weights = routing()
    code, output, _ = rewrite(experts, hidden.bfloat16(), index, weights.bfloat16())
    assert "fp8_rowwise_grouped_mm" in code and "grouped_mm(" not in code.replace("fp8_rowwise_grouped_mm", "")
    assert relative_error(output, experts_reference(experts, hidden.bfloat16(), index, weights.bfloat16())) < 1e-2


class LoopedExperts(nn.Module):
    """A loop over the experts, each a linear on W[e] (transformers' `eager` spelling with the expert as
    a Python int, which Dynamo unrolls): F.linear(x, W[e]), or x @ V[e] with V [E, K, N] plus a bias."""

    def __init__(self, transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        self.weight = nn.Parameter(torch.randn((EXPERTS, HIDDEN, 32) if transposed else (EXPERTS, 32, HIDDEN)) / 8)
        self.bias = nn.Parameter(torch.randn(EXPERTS, 32))

    def forward(self, x, gates):
        out = torch.zeros(x.shape[0], 32)
        for e in range(EXPERTS):
            y = x @ self.weight[e] + self.bias[e] if self.transposed else F.linear(x, self.weight[e], self.bias[e])
            out = out + y * gates[:, e : e + 1]
        return out


@pytest.mark.parametrize("transposed", [False, True], ids=["linear(x, W[e], b[e])", "x @ V[e] + b[e]"])
def test_indexed_sites_are_one_row_and_match_the_reference(transposed):
    torch.manual_seed(0)
    model = LoopedExperts(transposed)
    x, gates = torch.randn(TOKENS, HIDDEN), torch.rand(TOKENS, EXPERTS)
    code, output, plan = rewrite(model, x, gates)
    (row,) = plan
    assert (row.layer, row.site.kind, row.shape, row.scheme, len(row.sites)) == ("weight", "indexed", "8 x 32 x 64", "fp8_rowwise", 8)
    assert str(plan).endswith("0 of 0 linear layers and 1 of 1 expert weights quantized")
    assert code.count("fp8_rowwise_linear.default(") == EXPERTS and "matmul" not in code and "linear(" not in code.replace("rowwise_linear(", "")
    weight = model.weight.detach().double()
    weight = weight.transpose(1, 2) if transposed else weight
    expected = sum(
        (expert_matmul(x, weight, torch.full((TOKENS,), e)) + model.bias.detach()[e].double()) * gates[:, e : e + 1].double()
        for e in range(EXPERTS)
    )
    assert relative_error(output, expected) < 1e-6


def test_indexed_sites_of_an_exported_program_select_their_expert():
    """aten level: W[e] is select(W, 0, e); the program holds the quantized [E, N, K] tensors once."""
    torch.manual_seed(0)
    model = LoopedExperts()
    x, gates = torch.randn(TOKENS, HIDDEN), torch.rand(TOKENS, EXPERTS)
    program = fxquant.export(model, (x, gates), config=QuantConfig(scheme="fp8_rowwise"))
    assert "weight" not in program.state_dict and program.state_dict["fxquant_weight_weight"].shape == (EXPERTS, 32, HIDDEN)
    _, expected, _ = rewrite(model, x, gates)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, gates), expected, rtol=0, atol=0)


def test_int8_keeps_indexed_expert_weights_with_its_reason():
    _, _, plan = rewrite(LoopedExperts(), torch.randn(TOKENS, HIDDEN), torch.rand(TOKENS, EXPERTS), config=QuantConfig(scheme="int8"))
    (row,) = plan
    assert row.scheme is None and row.note == "int8 has no expert form (batched or grouped) for expert weights"


# The plan of each whole model: its linear layers, one row per expert tensor, the router skipped.
ROUTERS = {"qwen3_moe": "gate", "mixtral": "gate", "deepseek_v3": "gate", "gpt_oss": "router"}
COUNTS = {  # (linear layers quantized, of, expert weights quantized, of): 2 layers; DeepSeek-V3's first is dense
    "qwen3_moe": "8 of 11 linear layers and 4 of 4 expert weights quantized",
    "mixtral": "8 of 11 linear layers and 4 of 4 expert weights quantized",
    "deepseek_v3": "16 of 18 linear layers and 2 of 2 expert weights quantized",
    "gpt_oss": "8 of 11 linear layers and 4 of 4 expert weights quantized",
}


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("model", MOE_MODELS)
def test_plans_list_each_expert_tensor_and_skip_the_router(model, implementation):
    dtype = torch.bfloat16 if implementation == "grouped_mm" else torch.float32  # torch's grouped_mm traces in bf16
    plan = fxquant.plan(MOE_MODELS[model](implementation).to(dtype), torch.randint(0, 64, (2, 5)),
                        config=QuantConfig(scheme="fp8_rowwise"))  # auto is int8 on the CPU: no expert form
    rows = {row.layer: row for row in plan}
    moe_layer = "model.layers.1.mlp"
    up, down = rows[f"{moe_layer}.experts.gate_up_proj"], rows[f"{moe_layer}.experts.down_proj"]
    assert (up.site.kind, up.shape, up.scheme) == (implementation.removesuffix("_mm"), "8 x 64 x 64", "fp8_rowwise")
    assert (down.shape, down.scheme) == ("8 x 64 x 32", "fp8_rowwise")
    router = rows[f"{moe_layer}.{ROUTERS[model]}"]
    assert router.scheme is None and router.note == ROUTER_NOTE
    assert str(plan).endswith(COUNTS[model])
    if model == "deepseek_v3":  # the dense first layer and the shared expert are plain linear layers
        assert rows["model.layers.0.mlp.down_proj"].scheme == rows[f"{moe_layer}.shared_experts.down_proj"].scheme == "fp8_rowwise"


def test_a_rule_quantizes_a_router():
    plan = fxquant.plan(MOE_MODELS["qwen3_moe"]("batched_mm", layers=1), torch.randint(0, 64, (2, 5)),
                        config=QuantConfig(rules={"*.mlp.gate": "fp8_rowwise"}))
    router = {row.layer: row for row in plan}["model.layers.0.mlp.gate"]
    assert router.scheme is None and router.note == "rule '*.mlp.gate'; N=8 not divisible by 16"


def test_the_eager_implementation_adds_no_graph_break_and_its_loop_stays_outside_the_graphs():
    """transformers' `eager` experts graph-break at their data-dependent `nonzero` and run their loop
    outside any graph (Dynamo skips the frame): compiling with fxquant breaks exactly where plain
    torch.compile breaks, and the plan has no expert rows (fxquant.quantize_ quantizes those experts)."""
    model, tokens = MOE_MODELS["qwen3_moe"]("eager", layers=1), torch.randint(0, 64, (2, 5))
    breaks = []
    for trace in (lambda: torch.compile(model, backend="eager", dynamic=False)(tokens), lambda: fxquant.plan(model, tokens)):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch.no_grad():
            result = trace()
        breaks.append(sum(torch._dynamo.utils.counters["graph_break"].values()))
    assert breaks[0] == breaks[1] > 0
    assert [row.layer for row in result if row.site.kind != "linear"] == []
    assert ROUTER_NOTE in {row.note for row in result}  # the graphs around the loop were read


class MoeGraphsTest(TestCase):
    def test_golden_graphs(self):
        """The rewritten experts block of each implementation (Qwen3-MoE's, 2 tokens): the expert
        matmuls become fxquant's ops on the quantized [E, N, K] tensors; everything else stays."""
        experts = MOE_MODELS["qwen3_moe"]("batched_mm", layers=1).model.layers[0].mlp.experts
        hidden, index, weights = (t[:2] for t in routing())
        code, _, _ = rewrite(experts, hidden, index, weights)
        self.assertExpectedInline(code, """\
def forward(self, L_args_1_, L_args_0_, L_args_2_, gate_up_proj_, down_proj_):
    selected_hidden_states = l_args_0_.repeat_interleave(2, dim = 0)
    sample_weights = l_args_2_.reshape(-1)
    expert_ids = l_args_1_.reshape(-1)
    unsqueeze = selected_hidden_states.unsqueeze(-1)
    fxquant_gate_up_proj_weight = self.fxquant_gate_up_proj_weight
    fxquant_gate_up_proj_scale = self.fxquant_gate_up_proj_scale
    squeeze_dim = torch.ops.aten.squeeze.dim(unsqueeze, 2)
    fp8_rowwise_batched_mm_default = torch.ops.fxquant.fp8_rowwise_batched_mm.default(squeeze_dim, fxquant_gate_up_proj_weight, fxquant_gate_up_proj_scale, expert_ids, None)
    unsqueeze_default = torch.ops.aten.unsqueeze.default(fp8_rowwise_batched_mm_default, 2)
    out = unsqueeze_default.squeeze(-1)
    chunk = out.chunk(2, dim = -1)
    gate = chunk[0]
    up = chunk[1]
    silu = torch.nn.functional.silu(gate)
    proj_out = silu * up
    unsqueeze_1 = proj_out.unsqueeze(-1)
    fxquant_down_proj_weight = self.fxquant_down_proj_weight
    fxquant_down_proj_scale = self.fxquant_down_proj_scale
    squeeze_dim_1 = torch.ops.aten.squeeze.dim(unsqueeze_1, 2)
    fp8_rowwise_batched_mm_default_1 = torch.ops.fxquant.fp8_rowwise_batched_mm.default(squeeze_dim_1, fxquant_down_proj_weight, fxquant_down_proj_scale, expert_ids, None)
    unsqueeze_default_1 = torch.ops.aten.unsqueeze.default(fp8_rowwise_batched_mm_default_1, 2)
    out_1 = unsqueeze_default_1.squeeze(-1)
    unsqueeze_2 = sample_weights.unsqueeze(-1)
    weighted_out = out_1 * unsqueeze_2
    view = weighted_out.view(2, 2, 64)
    final_hidden_states = view.sum(dim = 1)
    to = final_hidden_states.to(torch.float32)
    return (to,)""")
        experts.config._experts_implementation = "grouped_mm"
        torch._dynamo.reset()
        code, _, _ = rewrite(experts, hidden, index, weights)
        self.assertExpectedInline(code, """\
def forward(self, L_args_0_, L_args_1_, L_args_2_, gate_up_proj_, down_proj_):
    sample_weights = l_args_2_.reshape(-1)
    expert_ids = l_args_1_.reshape(-1)
    sort = torch.sort(expert_ids)
    expert_ids_g = sort[0]
    perm = sort[1]
    floordiv = perm // 2
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float()
    tokens_per_expert = torch.histc(histc_input, bins = 8, min = 0, max = 7)
    offsets = torch.cumsum(tokens_per_expert, dim = 0, dtype = torch.int32)
    fxquant_gate_up_proj_weight = self.fxquant_gate_up_proj_weight
    fxquant_gate_up_proj_scale = self.fxquant_gate_up_proj_scale
    fp8_rowwise_grouped_mm_default_2 = torch.ops.fxquant.fp8_rowwise_grouped_mm.default(l_args_0_, fxquant_gate_up_proj_weight, fxquant_gate_up_proj_scale, offsets, None, rows = floordiv)
    chunk = fp8_rowwise_grouped_mm_default_2.chunk(2, dim = -1)
    gate = chunk[0]
    up = chunk[1]
    silu = torch.nn.functional.silu(gate)
    proj_out = silu * up
    to_1 = proj_out.to(torch.float32)
    fxquant_down_proj_weight = self.fxquant_down_proj_weight
    fxquant_down_proj_scale = self.fxquant_down_proj_scale
    fp8_rowwise_grouped_mm_default_1 = torch.ops.fxquant.fp8_rowwise_grouped_mm.default(to_1, fxquant_down_proj_weight, fxquant_down_proj_scale, offsets, None)
    unsqueeze = sample_weights_g.unsqueeze(-1)
    weighted_out = fp8_rowwise_grouped_mm_default_1 * unsqueeze
    inv_perm = torch.empty_like(perm)
    arange = torch.arange(4, device = device(type='cpu'))
    inv_perm[perm] = arange;  setitem = inv_perm
    weighted_out_1 = weighted_out[inv_perm]
    view = weighted_out_1.view(2, 2, 64)
    final_hidden_states = view.sum(dim = 1)
    to_2 = final_hidden_states.to(torch.float32)
    return (to_2,)""")
        looped = LoopedExperts()
        torch._dynamo.reset()
        code, _, _ = rewrite(looped, torch.randn(2, HIDDEN), torch.rand(2, EXPERTS))
        self.assertExpectedInline(code.split("out_1 = ")[0], """\
def forward(self, L_x_, weight_, bias_, L_gates_):
    out = torch.zeros(2, 32)
    getitem_1 = bias_[0]
    fxquant_weight_weight = self.fxquant_weight_weight
    fxquant_weight_scale = self.fxquant_weight_scale
    select_int = torch.ops.aten.select.int(fxquant_weight_weight, 0, 0)
    select_int_1 = torch.ops.aten.select.int(fxquant_weight_scale, 0, 0)
    fp8_rowwise_linear_default = torch.ops.fxquant.fp8_rowwise_linear.default(l_x_, select_int, select_int_1, getitem_1, None)
    getitem_2 = l_gates_[(slice(None, None, None), slice(0, 1, None))]
    mul = fp8_rowwise_linear_default * getitem_2
    """)


class StoredExpertsGraphTest(TestCase):
    def test_stored_experts_are_read_through_their_float_presentation(self):
        """After fxquant.quantize_, a trace sees each stored expert weight as `W_q.to(float32)`: the site
        is read on the stored e4m3 weight, whose scale the module holds; the conversion goes with the
        rewrite, leaving the float model's graph with the stored tensors."""
        model = MOE_MODELS["qwen3_moe"]("grouped_mm", layers=1)
        experts = model.model.layers[0].mlp.experts
        hidden, index, weights = (t[:2] for t in routing())
        _, expected, _ = rewrite(experts, hidden, index, weights)
        fxquant.quantize_(model)
        torch._dynamo.reset()
        code, output, plan = rewrite(experts, hidden, index, weights)
        assert [(row.layer, row.scheme, row.note) for row in plan] == [
            ("gate_up_proj", "fp8_rowwise", "stored quantized weights"), ("down_proj", "fp8_rowwise", "stored quantized weights")]
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
        self.assertExpectedInline(code, """\
def forward(self, L_args_0_, L_args_1_, L_args_2_, gate_up_proj_, down_proj_):
    sample_weights = l_args_2_.reshape(-1)
    expert_ids = l_args_1_.reshape(-1)
    sort = torch.sort(expert_ids)
    expert_ids_g = sort[0]
    perm = sort[1]
    floordiv = perm // 2
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float()
    tokens_per_expert = torch.histc(histc_input, bins = 8, min = 0, max = 7)
    offsets = torch.cumsum(tokens_per_expert, dim = 0, dtype = torch.int32)
    fxquant_gate_up_proj_stored_scale = self.fxquant_gate_up_proj_stored_scale
    fp8_rowwise_grouped_mm_default_2 = torch.ops.fxquant.fp8_rowwise_grouped_mm.default(l_args_0_, gate_up_proj_, fxquant_gate_up_proj_stored_scale, offsets, None, rows = floordiv)
    chunk = fp8_rowwise_grouped_mm_default_2.chunk(2, dim = -1)
    gate = chunk[0]
    up = chunk[1]
    silu = torch.nn.functional.silu(gate)
    proj_out = silu * up
    to_1 = proj_out.to(torch.float32)
    fxquant_down_proj_stored_scale = self.fxquant_down_proj_stored_scale
    fp8_rowwise_grouped_mm_default_1 = torch.ops.fxquant.fp8_rowwise_grouped_mm.default(to_1, down_proj_, fxquant_down_proj_stored_scale, offsets, None)
    unsqueeze = sample_weights_g.unsqueeze(-1)
    weighted_out = fp8_rowwise_grouped_mm_default_1 * unsqueeze
    inv_perm = torch.empty_like(perm)
    arange = torch.arange(4, device = device(type='cpu'))
    inv_perm[perm] = arange;  setitem = inv_perm
    weighted_out_1 = weighted_out[inv_perm]
    view = weighted_out_1.view(2, 2, 64)
    final_hidden_states = view.sum(dim = 1)
    to_2 = final_hidden_states.to(torch.float32)
    return (to_2,)""")

    def test_stored_expert_tensors_that_do_not_fit_are_an_error_naming_them(self):
        model = MOE_MODELS["qwen3_moe"]("batched_mm", layers=1)
        fxquant.quantize_(model)
        experts = model.model.layers[0].mlp.experts
        experts.down_proj_scale = experts.down_proj_scale[:, :32].clone()
        problem = r"'down_proj'.*\[8, 64, 32\].*its weight_scale is torch.float32 \[8, 32\], not torch.float32 \[8, 64\]"
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=problem):
            rewrite(experts, *(t[:2] for t in routing()))


def test_stored_experts_export_with_their_stored_tensors():
    """torch.export lifts the stored weight and its scale as buffers: the program runs them as stored."""
    model = MOE_MODELS["qwen3_moe"]("batched_mm", layers=1)
    fxquant.quantize_(model)
    experts = model.model.layers[0].mlp.experts
    inputs = routing()
    with torch.no_grad():
        expected = experts(*inputs)
        program = fxquant.export(experts, inputs)
        assert program.state_dict["gate_up_proj"].dtype == torch.float8_e4m3fn and "gate_up_proj_scale" in program.state_dict
        torch.testing.assert_close(program.module()(*inputs), expected, rtol=0, atol=0)


def test_stored_experts_under_another_backend_are_an_error_not_raw_codes():
    """The presentation op (fxquant::stored_weight) runs only inside fxquant's rewrite: compiled
    by another backend, the model stops with the reason instead of multiplying unscaled e4m3 codes.
    (No opcheck: its real implementation is that error; its fake gives the float shape.)"""
    model = MOE_MODELS["qwen3_moe"]("batched_mm", layers=1)
    fxquant.quantize_(model)
    with torch.no_grad(), pytest.raises(RuntimeError, match="ran outside fxquant's rewrite; compile the model with backend='fxquant'"):
        torch.compile(model.model.layers[0].mlp.experts, backend="eager")(*routing())
    with torch._subclasses.fake_tensor.FakeTensorMode():
        presented = torch.ops.fxquant.stored_weight(torch.empty(8, 64, 32, dtype=torch.float8_e4m3fn), torch.bfloat16)
    assert (presented.dtype, tuple(presented.shape)) == (torch.bfloat16, (8, 64, 32))
