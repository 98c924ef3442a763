"""Who keeps what (fxquant/quantized_copies.py, fxquant/backend.py): quantized weights go with their
model or with `fxquant.release`, and a backend keeps no compiled graph unless asked."""

import gc
import types
import weakref

import pytest
import torch
from torch import fx

import fxquant
from fxquant.plan_summary import PlanSummary
from tests.models import MLP


def compiled_mlp(backend):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(2, 8, 64)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        output = compiled(x)
    return model, compiled, x, output


def weak_tensors(model) -> list[weakref.ref]:
    return [weakref.ref(t) for copy in fxquant.quantized_copies(model) for t in copy.tensors.values()]


def reachable(root, kinds: tuple[type, ...]) -> list:
    """Objects of `kinds` reachable from `root` through references (not through classes, modules or
    functions, which reach everything)."""
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, kinds):
            found.append(obj)
        stack.extend(gc.get_referents(obj))
    return found


def test_quantized_weights_are_freed_with_their_model():
    backend = fxquant.backend()  # the user's object, alive after the model
    model, compiled, *_ = compiled_mlp(backend)
    tensors = weak_tensors(model)
    assert len(tensors) == 4, "up and down: a weight and a scale each"
    del model, compiled
    torch._dynamo.reset()
    gc.collect()
    assert [ref() for ref in tensors] == [None] * 4
    assert reachable(backend, (fx.GraphModule, fx.Node, torch.Tensor)) == [], "the backend keeps nothing of the graph"


def test_release_frees_a_live_models_copies_and_the_next_compile_quantizes_again():
    model, compiled, x, output = compiled_mlp("fxquant")
    held = fxquant.quantized_copies(model)
    expected_bytes = sum(t.numel() * t.element_size() for copy in held for t in copy.tensors.values())
    tensors = weak_tensors(model)
    del held, compiled
    torch._dynamo.reset()
    gc.collect()
    assert all(ref() is not None for ref in tensors), "the model's parameters still own their copies"

    assert fxquant.release(model) == expected_bytes
    gc.collect()
    assert [ref() for ref in tensors] == [None] * 4 and fxquant.quantized_copies(model) == []
    assert fxquant.release(model) == 0
    with torch.no_grad():
        again = torch.compile(model, backend="fxquant")(x)
    assert torch.equal(again, output) and len(fxquant.quantized_copies(model)) == 2


def test_a_graph_compiled_before_release_keeps_running_on_its_copies():
    model, compiled, x, output = compiled_mlp("fxquant")
    fxquant.release(model)
    gc.collect()
    with torch.no_grad():
        assert torch.equal(compiled(x), output)


def test_graphs_and_full_plans_are_kept_only_when_asked():
    light, kept = fxquant.backend(), fxquant.backend(keep_graphs=True)
    compiled_mlp(light)
    torch._dynamo.reset()
    compiled_mlp(kept)
    with pytest.raises(AttributeError, match="keep_graphs=True"):
        light.graphs
    (summary,), (plan,), (gm,) = light.plans, kept.plans, kept.graphs
    assert isinstance(summary, PlanSummary) and isinstance(plan, fxquant.Plan) and isinstance(gm, fx.GraphModule)
    assert str(summary) == str(plan), "the summary prints the plan's table"
    assert [(r.layer, r.scheme, r.note) for r in summary] == [(e.layer, e.scheme, e.note) for e in plan]
    assert [r.layer for r in summary.rewritten] == ["up", "down"] and [r.layer for r in summary.skipped] == ["lm_head"]
