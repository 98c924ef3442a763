"""The backend end to end (fxquant/backend.py): Dynamo → passes → Inductor, on an MLP.

Checks what a user relies on: the entry point without `import fxquant`, numerics after Inductor,
weights changed after compilation, grad mode, dynamic shapes, option errors, the user's model
left untouched.
"""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

import fxquant
from fxquant import QuantConfig
from tests.graphs import rewrite
from tests.models import MLP, relative_error

BOUND = {"fp8_rowwise": 0.08, "int8": 0.02}


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8"])
def test_compiled_output_differs_from_float_by_quantization_only(scheme):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16, 64)
    compiled = torch.compile(model, backend="fxquant", options={"scheme": scheme})
    with torch.no_grad():
        error = relative_error(compiled(x), model(x))
    assert 0 < error < BOUND[scheme], f"{scheme}: relative error {error:.4f}"
    assert counters["fxquant"][f"{scheme}_linear"] == 2 and counters["fxquant"]["skipped"] == 1


def test_inductor_output_equals_the_eager_rewritten_graph():
    """Inductor adds nothing of its own: the compiled result is the ops' reference result."""
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    config = QuantConfig(scheme="int8")
    _, eager_rewritten, _ = rewrite(model, x, config=config)
    with torch.no_grad():
        compiled = torch.compile(model, backend=fxquant.backend(config))(x)
    torch.testing.assert_close(compiled, eager_rewritten, rtol=1e-5, atol=1e-5)


def test_entry_point_works_without_importing_fxquant():
    script = textwrap.dedent(
        """
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        out = torch.compile(model, backend="fxquant", options={"scheme": "int8"})(torch.randn(2, 64))
        assert "fxquant" in sys.modules  # loaded by the entry point, not by this script
        print(out.shape, torch._dynamo.utils.counters["fxquant"]["int8_linear"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "torch.Size([2, 32]) 2"


def test_weight_changed_in_place_is_requantized():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    compiled = torch.compile(model, backend=fxquant.backend(scheme="int8"))
    with torch.no_grad():
        compiled(x)
        model.up.weight.mul_(3.0)
        model.down.weight.copy_(torch.randn_like(model.down.weight))
        error = relative_error(compiled(x), model(x))
    assert error < BOUND["int8"], f"stale quantized weights: error {error:.4f} after an in-place update"


def test_weight_replaced_by_a_new_parameter_is_requantized():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    compiled = torch.compile(model, backend=fxquant.backend(scheme="int8"))
    with torch.no_grad():
        compiled(x)
        model.up.weight = torch.nn.Parameter(torch.randn_like(model.up.weight))
        error = relative_error(compiled(x), model(x))
    assert error < BOUND["int8"], f"stale quantized weights after replacing a parameter: {error:.4f}"


def test_grad_mode_on_runs_inference_and_backward_is_a_clear_error():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    compiled = torch.compile(model, backend="fxquant")
    with_grad = compiled(x)  # parameters require grad, grad mode on: still compiles and runs
    with torch.no_grad():
        torch.testing.assert_close(with_grad.detach(), compiled(x))
    with pytest.raises(RuntimeError, match="inference-only"):
        with_grad.sum().backward()


def test_new_sequence_lengths_do_not_recompile_after_the_dynamic_one():
    model = MLP()
    backend = fxquant.backend(keep_graphs=True)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for tokens in (8, 12, 16, 20, 33, 64):
            compiled(torch.randn(2, tokens, 64))
    assert len(backend.plans) == 2, "one static graph, one dynamic graph, then no more compiles"
    assert backend.graphs[0].fxquant_up_weight is backend.graphs[1].fxquant_up_weight, "graphs share quantized weights"


def keyword_renamed(forward):
    """A `*args` wrapper around `forward`, as transformers' `deprecate_kwarg` puts on Llama's: the
    frame Dynamo compiles is the wrapper's, and the model is its `args[0]`."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class WrappedMLP(MLP):
    forward = keyword_renamed(MLP.forward)


def test_a_wrapped_forward_names_layers_from_the_model():
    backend = fxquant.backend(keep_graphs=True)
    with torch.no_grad():
        torch.compile(WrappedMLP(), backend=backend)(torch.randn(2, 64))
    (plan,) = backend.plans
    assert [entry.layer for entry in plan.rewritten] == ["up", "down"]
    assert [entry.layer for entry in plan.skipped] == ["lm_head"], "lm_head is skipped by default"
    assert hasattr(backend.graphs[0], "fxquant_up_weight"), "quantized weights are named after the model's"


def test_users_model_is_unchanged():
    model = MLP()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        torch.compile(model, backend="fxquant")(torch.randn(2, 64))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert type(model.up) is torch.nn.Linear


def test_unknown_option_through_torch_compile_is_a_clear_error():
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(MLP(), backend="fxquant", options={"schme": "int8"})(torch.randn(2, 64))


def test_backend_accepts_a_config_or_options_not_both():
    assert fxquant.backend(scheme="int8").config == QuantConfig(scheme="int8")
    with pytest.raises(ValueError, match="not both"):
        fxquant.backend(QuantConfig(), scheme="int8")


def test_compile_mode_reaches_inductor():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    compiled = torch.compile(model, backend="fxquant", mode="max-autotune-no-cudagraphs")
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < BOUND["fp8_rowwise"]
