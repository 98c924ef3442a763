"""Whole-row reductions in decode-shaped graphs (fxquant/inductor/choices.py): which reductions the
choices make persistent, how the backend installs them, and (gpu marker) a decode-shaped RMSNorm →
SwiGLU under CUDA graphs: RMSNorm + quantization one persistent kernel, SiLU·mul + quantization one
kernel where Inductor's own settings split it."""

import sys
from types import SimpleNamespace

import pytest
import sympy
import torch
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.utils import run_and_get_code
from torch._inductor.virtualized import V

import fxquant
from fxquant.inductor.choices import WholeRowReductions
from fxquant.inductor.tuning import DEFAULT
from fxquant.inductor.settings import fxquant_inductor_settings
from tests.inductor.test_decompositions import kernels, rms_norm
from tests.models import relative_error


WHOLE_ROW_LIMIT = DEFAULT.whole_row_limit  # a CPU machine's row


def persistent(numel: int, hint: ReductionHint) -> bool:
    features = SimpleNamespace(reduction_numel=sympy.Integer(numel), numel=sympy.Integer(1), get_reduction_hint=lambda: hint)
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
        return WholeRowReductions().should_use_persistent_reduction(features, cooperative_reduction=False)


@pytest.mark.parametrize(("numel", "hint", "expected"), [
    (4096, ReductionHint.INNER, True),  # Llama-3-8B's hidden size
    (WHOLE_ROW_LIMIT, ReductionHint.INNER, True),
    (14336, ReductionHint.INNER, False),  # its SiLU·mul row: Inductor's loop
    (WHOLE_ROW_LIMIT + 1, ReductionHint.INNER, False),
    (512, ReductionHint.INNER, True),  # Inductor's own choice (≤ 1024)
    (4096, ReductionHint.OUTER, False),  # not a row: Inductor's choice
])
def test_inner_reductions_up_to_the_limit_are_persistent(numel, hint, expected):
    assert persistent(numel, hint) is expected


def test_decode_shaped_graphs_reduce_whole_rows_in_every_mode():
    for mode in ({}, torch._inductor.list_mode_options("reduce-overhead")):
        decode, prefill = fxquant_inductor_settings(mode, tokens=16), fxquant_inductor_settings(mode, tokens=2048)
        assert decode["inductor_choices_class"] is WholeRowReductions and decode["split_reductions"] is False
        assert "inductor_choices_class" not in prefill
    assert "split_reductions" not in fxquant_inductor_settings(torch._inductor.list_mode_options("reduce-overhead"), tokens=2048)


def test_backend_installs_the_choices_while_compiling(monkeypatch):
    seen = []

    def compile_fx(gm, inputs, config_patches):
        seen.append((type(V.choices), torch.compiler.config.cache_key_tag, config_patches))
        return gm.forward

    monkeypatch.setattr(sys.modules["fxquant.backend"], "compile_fx", compile_fx)  # fxquant.backend is the function
    backend = fxquant.backend(inductor={"inductor_choices_class": WholeRowReductions})
    torch.compile(torch.nn.Linear(64, 32), backend=backend)(torch.randn(2, 64))
    (choices, tag, patches), = seen
    assert choices is WholeRowReductions and "inductor_choices_class" not in patches
    assert tag.endswith(f"|choices:{WholeRowReductions().uuid()}")  # a compiled graph's cache key says which choices made it
    assert type(V.choices) is not WholeRowReductions  # Inductor's own again after the compile


class NormSwiGLU(torch.nn.Module):
    """Llama's RMSNorm feeding its MLP, SiLU(gate) · up feeding the down projection (Llama-3-8B's
    MLP width; a hidden size above Inductor's 1024-element persistent limit)."""

    def __init__(self, dim=2048, hidden=14336):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.ones(dim))
        self.gate, self.up = torch.nn.Linear(dim, hidden, bias=False), torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = rms_norm(x, self.norm_weight)
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def inductors_kernels(code: str) -> list[str]:
    """The kernels Inductor generated, the GEMMs aside (FBGEMM's, fxquant's Triton kernels or templates)."""
    return [k for k in kernels(code) if k.startswith("'triton_") and not k.startswith("'triton_tem_")]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16])
def test_decode_reductions_are_whole_rows(tokens):
    torch.manual_seed(0)
    model = NormSwiGLU().cuda().to(torch.bfloat16)
    x = torch.randn(tokens, 1, 2048, device="cuda", dtype=torch.bfloat16)
    inductors_own = fxquant.backend(inductor={"inductor_choices_class": None, "split_reductions": True})
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        out, (code, *_) = run_and_get_code(torch.compile(model, backend="fxquant", mode="reduce-overhead"), x)
        torch._dynamo.reset()
        _, (split_code, *_) = run_and_get_code(torch.compile(model, backend=inductors_own, mode="reduce-overhead"), x)
        expected = model(x)
    norm, swiglu = inductors_kernels(code)
    assert norm.startswith("'triton_per_") and "rsqrt" in norm, f"want one persistent RMSNorm + quantization kernel:\n{code}"
    assert "libdevice.exp" in swiglu and "float8" in swiglu, f"want SiLU·mul and its quantization in one kernel:\n{code}"
    assert len(inductors_kernels(split_code)) > 2, f"Inductor's own split takes more:\n{split_code}"
    assert relative_error(out, expected) < 0.08  # FP8 against the bf16 model, as test_backend_uses_the_lowering_on_cuda
