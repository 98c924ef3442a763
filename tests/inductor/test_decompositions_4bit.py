"""fxquant::linear_4bit under Inductor (fxquant/inductor/decompositions_4bit.py), on the CPU with the
decomposition's device widened to it: up to 16 rows become the kernels' partial sums
(fxquant::linear_4bit_partials) and their sum, cast and bias as Inductor code; more rows keep the op whole."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fxquant
from fxquant.inductor import install
from fxquant.ops.blockwise_4bit import linear_4bit_reference
from fxquant.ops.linear_4bit_partials import linear_from_partials


@pytest.fixture
def lowered_on_the_cpu(monkeypatch):
    monkeypatch.setattr(install, "LOWERED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))


def nf4_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.SiLU(), torch.nn.Linear(512, 128, bias=False)).eval()


def stored(layer):
    scheme = fxquant.SCHEMES["nf4"]
    tensors = scheme.quantize(layer.weight.detach(), scheme.options({}))
    return tuple(tensors[name] for name in ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset"))


@pytest.mark.parametrize("rows", [1, 16])
def test_a_few_rows_run_the_partials_and_sum_them_in_inductor_code(lowered_on_the_cpu, rows):
    model = nf4_model()
    x = torch.randn(rows, 1024)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(torch.compile(model, backend=fxquant.backend(scheme="nf4")), x)
        # the same arithmetic, eagerly: the op's partial sums (its CPU reference), added, + bias, between the layers
        hidden = linear_from_partials(torch.ops.fxquant.linear_4bit_partials(x, *stored(model[0]), "nf4", 64), x.dtype, model[0].bias)
        hidden = torch.nn.functional.silu(hidden)
        expected = linear_from_partials(torch.ops.fxquant.linear_4bit_partials(hidden, *stored(model[2]), "nf4", 64), x.dtype, None)
        reference = linear_4bit_reference(torch.nn.functional.silu(linear_4bit_reference(x, *stored(model[0]), "nf4", 64, None, model[0].bias)),
                                          *stored(model[2]), "nf4", 64)
    assert code.count("linear_4bit_partials.default(") == 2 and "linear_4bit.default(" not in code
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # float32: only the summation order may differ
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)  # the reference's weight is float32 too


def test_more_rows_keep_the_op_whole(lowered_on_the_cpu):
    model = nf4_model()
    x = torch.randn(17, 1024)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(torch.compile(model, backend=fxquant.backend(scheme="nf4")), x)
        hidden = torch.nn.functional.silu(linear_4bit_reference(x, *stored(model[0]), "nf4", 64, None, model[0].bias))
        expected = linear_4bit_reference(hidden, *stored(model[2]), "nf4", 64)
    assert code.count("linear_4bit.default(") == 2 and "linear_4bit_partials" not in code
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # the op, called by Inductor: its CPU reference


def test_the_partials_reference_adds_up_to_the_product():
    layer = nf4_model()[0]
    x = torch.randn(5, 1024)
    partials = torch.ops.fxquant.linear_4bit_partials(x, *stored(layer), "nf4", 64)
    weight = linear_4bit_reference(torch.eye(1024), *stored(layer), "nf4", 64).t()  # the float32 dequantized weight
    assert partials.shape[0] > 1 and partials.shape[1:] == (5, 512) and partials.dtype == torch.float32
    torch.testing.assert_close(partials.sum(0), x @ weight.t(), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="1 ≤ M ≤ 16"):
        torch.ops.fxquant.linear_4bit_partials(torch.randn(17, 1024), *stored(layer), "nf4", 64)
