"""Weights changed after compiling (fxquant/weight_updates.py, fxquant/weight_stamp.py): every way a
user or a library changes a parameter (in place, through `.data` as LoRA merges and EMA updates do,
by new data or a new Parameter) is re-quantized on the next call, in every kind of layer the backend
quantizes, and in every graph Dynamo compiles for the model; where it cannot be (folded static
scales) it is an error.

The reference for "re-quantized" is a fresh compile of a deep copy of the updated model (new
parameter objects, so nothing is shared with the first compile): on the CPU the two run the same
code on the same quantized weights, so their outputs must be equal bit for bit.
"""

import copy

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import fxquant
from fxquant import QuantConfig
from fxquant.weight_stamp import SAMPLES, SampledValues, WeightStamp, spread_sample
from tests.models import MLP, relative_error


class Targets(nn.Module):
    """One of each kind of quantized parameter: a plain nn.Linear with a bias; q/k/v, which the
    backend merges into one GEMM on their stacked weights; a weight tied between two layers; and
    `x @ W.t()` / `x @ V` (V stored [K, N]) on bare parameters."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.tied_a, self.tied_b = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.tied_b.weight = self.tied_a.weight
        self.w = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.v_kn = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x):
        h = torch.relu(self.linear(x))
        h = self.q(h) * torch.sigmoid(self.k(h)) + self.v(h)
        h = self.tied_b(torch.relu(self.tied_a(h)))
        return torch.tanh(h @ self.w.t()) @ self.v_kn


# target → the (module path, attribute) places that hold the parameter
TARGETS = {
    "nn.Linear": [("linear", "weight")],
    "merged k_proj": [("k", "weight")],
    "tied weight": [("tied_a", "weight"), ("tied_b", "weight")],
    "x @ W.t()": [("", "w")],
    "x @ V (stored [K, N])": [("", "v_kn")],
}


def lora_merge(w: torch.Tensor) -> None:
    rank = 4
    b, a = torch.randn(w.shape[0], rank) / 4, torch.randn(rank, w.shape[1]) / 4
    w.data.add_(b @ a)


def new_parameter(model: nn.Module, target: str) -> None:
    places = TARGETS[target]
    old = parameter(model, target)
    new = nn.Parameter(torch.randn_like(old) / old.shape[1] ** 0.5)
    for path, name in places:
        setattr(model.get_submodule(path), name, new)


def assign_data(w: torch.Tensor) -> None:
    w.data = torch.randn_like(w) / w.shape[1] ** 0.5


# update → a function of the parameter, run under torch.no_grad() ("new Parameter": of the model and the target)
UPDATES = {
    "w.data.mul_(s)": lambda w: w.data.mul_(1.5),
    "w.data.copy_(t)": lambda w: w.data.copy_(torch.randn_like(w) / w.shape[1] ** 0.5),
    "w.data = t": assign_data,
    "w.data.add_(B @ A) (LoRA merge)": lora_merge,
    "w.data.lerp_(ema, 0.1) (EMA)": lambda w: w.data.lerp_(torch.randn_like(w), 0.1),
    "torch._foreach_lerp_([w.data], ...)": lambda w: torch._foreach_lerp_([w.data], [torch.randn_like(w)], 0.1),
    "w.mul_(s)": lambda w: w.mul_(1.5),
    "w.copy_(t)": lambda w: w.copy_(torch.randn_like(w) / w.shape[1] ** 0.5),
    "new Parameter": None,
}


def parameter(model: nn.Module, target: str) -> nn.Parameter:
    path, name = TARGETS[target][0]
    return getattr(model.get_submodule(path), name)


def update(model: nn.Module, target: str, how: str) -> None:
    if UPDATES[how] is None:
        new_parameter(model, target)
    else:
        UPDATES[how](parameter(model, target))


def fresh_compile_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of a compile that shares nothing with earlier ones: a deep copy of `model`."""
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(copy.deepcopy(model), backend="fxquant")(x)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("how", list(UPDATES))
def test_an_update_after_compiling_is_requantized_on_the_next_call(how, target):
    torch.manual_seed(0)
    model, x = Targets().eval(), torch.randn(2, 4, 64)
    compiled = torch.compile(model, backend="fxquant")
    with torch.no_grad():
        before = compiled(x)
        update(model, target, how)
        after = compiled(x)
    assert counters["fxquant"]["requantized_weights"] == 1, "the changed weight, once"
    assert not torch.equal(after, before), f"{how} on {target}: the compiled model ran the old weights"
    torch.testing.assert_close(after, fresh_compile_output(model, x), rtol=0, atol=0)


# Each update and each target once: a second graph is what the cache decides, whatever the update.
SECOND_GRAPH_CASES = [
    ("w.data.mul_(s)", "nn.Linear"),
    ("w.data = t", "merged k_proj"),
    ("torch._foreach_lerp_([w.data], ...)", "tied weight"),
    ("w.mul_(s)", "x @ W.t()"),
    ("new Parameter", "x @ V (stored [K, N])"),
]


def shared_copies(backend: fxquant.Backend) -> bool:
    """The backend's two graphs run the same quantized copy of every parameter."""
    first, second = ({entry.layer: entry.quantized.copy for entry in plan.rewritten} for plan in backend.plans)
    return len(first) > 0 and all(first[layer] is second[layer] for layer in first)


@pytest.mark.parametrize("check", [True, False], ids=["checked", "check_weight_updates=False"])
@pytest.mark.parametrize(("how", "target"), SECOND_GRAPH_CASES)
def test_a_graph_compiled_after_an_update_quantizes_the_new_weights(how, target, check):
    """A new input shape after an update compiles a second graph, which must not reuse the first
    graph's stale copy, even with the per-call check off (the compile itself checks the cache); a
    copy changed in place is re-quantized in place, for both graphs."""
    torch.manual_seed(0)
    model, x, longer = Targets().eval(), torch.randn(2, 4, 64), torch.randn(2, 6, 64)
    backend = fxquant.backend(check_weight_updates=check, keep_graphs=True)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(x)
        update(model, target, how)
        second_graph = compiled(longer)
    assert len(backend.plans) == 2
    torch.testing.assert_close(second_graph, fresh_compile_output(model, longer), rtol=0, atol=0)
    if how != "new Parameter":
        assert counters["fxquant"]["requantized_weights"] == 1 and shared_copies(backend)


@pytest.mark.parametrize(("how", "target"), SECOND_GRAPH_CASES)
def test_a_graph_compiled_after_a_refresh_shares_the_refreshed_copy(how, target):
    """The first graph re-quantizes (in place); the second, compiled after, reuses that copy: no
    second quantization, one copy of each weight in memory."""
    torch.manual_seed(0)
    model, x, longer = Targets().eval(), torch.randn(2, 4, 64), torch.randn(2, 6, 64)
    backend = fxquant.backend(keep_graphs=True)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(x)
        update(model, target, how)
        compiled(x)
        second_graph = compiled(longer)
    assert counters["fxquant"]["requantized_weights"] == 1
    assert shared_copies(backend), "the second graph made copies of its own"
    torch.testing.assert_close(second_graph, fresh_compile_output(model, longer), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["w.data.mul_(s)", "w.data = t", "torch._foreach_lerp_([w.data], ...)", "w.copy_(t)"])
def test_an_update_to_a_weight_whose_scale_was_folded_is_an_error(how):
    """Static fp8_tensorwise folds the weight's scale into the graph: re-quantizing cannot fix it."""
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 8, 64)
    batches = [(torch.randn(2, 8, 64),), (torch.randn(3, 5, 64),)]
    config = QuantConfig(scheme="fp8_tensorwise", static_activation_amax=fxquant.calibrate(model, batches).amax)
    compiled = torch.compile(model, backend=fxquant.backend(config))
    with torch.no_grad():
        compiled(x)
        UPDATES[how](model.down.weight)
        with pytest.raises(RuntimeError, match="down changed after compilation, but its scale was folded"):
            compiled(x)


@pytest.mark.slow
def test_lora_merged_into_a_tiny_llamas_attention_is_requantized():
    """PEFT's merge (`weight.data += B @ A * scaling`) into q_proj and v_proj of every layer, both
    members of a merged q/k/v GEMM: the logits after it are those of a fresh compile."""
    from tests.models import tiny_llama

    model, ids = tiny_llama(), torch.randint(0, 128, (1, 8))
    compiled = torch.compile(model, backend="fxquant")
    with torch.no_grad():
        before = compiled(ids).logits
        for layer in model.model.layers:
            lora_merge(layer.self_attn.q_proj.weight)
            lora_merge(layer.self_attn.v_proj.weight)
        after = compiled(ids).logits
    assert counters["fxquant"]["requantized_weights"] == 2 * len(model.model.layers)
    assert relative_error(after, before) > 0.01, "the compiled model ran the old weights"
    torch.testing.assert_close(after, fresh_compile_output(model, ids).logits, rtol=0, atol=0)


DENSE_SHAPES = [(64, 64), (16, 4096), (4096, 16), (448, 128), (8, 8)]


def positions(sample: torch.Tensor, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """(row, column) of each sampled element of a weight whose values are its row-major index."""
    return [divmod(int(index), shape[1]) for index in sample]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_a_dense_weights_sample_is_spread_over_its_rows_and_columns(shape, layout):
    rows, cols = shape
    index = torch.arange(rows * cols, dtype=torch.float64).reshape(rows, cols)
    weight = index if layout == "row-major" else index.t().contiguous().t()  # same values, column-major storage
    sampled = positions(spread_sample(weight), shape)
    n = min(SAMPLES, rows * cols)
    assert len(set(sampled)) == len(sampled) == n, "distinct elements, as many as asked for"
    assert len({r for r, _ in sampled}) >= 0.9 * min(n, rows) and len({c for _, c in sampled}) >= 0.9 * min(n, cols)


def test_a_strided_weights_sample_takes_one_element_per_row_and_column():
    storage = torch.arange(300 * 600, dtype=torch.float64).reshape(300, 600)
    weight = storage[10:, ::2]  # [290, 300]: neither row- nor column-major
    sampled = [divmod(int(index), 600) for index in spread_sample(weight)]
    assert all(r >= 10 and c % 2 == 0 for r, c in sampled), "elements of the weight only"
    on_weight = [(r - 10, c // 2) for r, c in sampled]
    assert len({r for r, _ in on_weight}) == len({c for _, c in on_weight}) == len(sampled) == SAMPLES


def test_weights_of_several_dtypes_are_compared_in_one_go():
    weights = [torch.randn(64, 128), torch.randn(32, 64).bfloat16(), torch.randn(16, 16).half()]
    stamps = [WeightStamp(w) for w in weights]
    values = SampledValues()
    assert values.unchanged(stamps)
    weights[1].mul_(2)
    assert not values.unchanged(stamps) and [s.matches(w) for s, w in zip(stamps, weights)] == [True, False, True]
    stamps[1] = WeightStamp(weights[1])  # re-stamped, as a re-quantization does
    assert values.unchanged(stamps)


def test_a_nan_written_through_data_is_an_error_naming_the_layer():
    torch.manual_seed(0)
    model, x = Targets().eval(), torch.randn(2, 4, 64)
    compiled = torch.compile(model, backend="fxquant")
    with torch.no_grad():
        compiled(x)
        model.linear.weight.data.mul_(float("nan"))
        with pytest.raises(ValueError, match="layer 'linear'.*NaN"):
            compiled(x)
