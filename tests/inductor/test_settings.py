"""fxquant's Inductor settings (fxquant/inductor/settings.py) and a user's own, through the backend."""

import sys

import pytest
import torch

import fxquant
from fxquant.inductor import settings as fxquant_settings
from fxquant.inductor.division import HAS_DIV_RN
from fxquant.inductor.settings import fxquant_inductor_settings


def test_default_mode_keeps_row_reductions_whole():
    assert fxquant_inductor_settings({}) == {"emulate_precision_casts": True, "split_reductions": False}


@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune"])
@pytest.mark.parametrize("tokens", [None, 1, 4096])
def test_divisions_round_as_inductors_default(mode, tokens):
    """Only the quantization's division is correctly rounded (fxquant::div_rn's lowering): fxquant's
    settings leave the graph's other divisions (SiLU's, softmax's) as plain torch.compile does."""
    settings = fxquant_inductor_settings(torch._inductor.list_mode_options(mode) if mode else {}, tokens)
    assert not any("division" in name or "divison" in name for name in settings)


@pytest.mark.skipif(torch.__version__ < "2.13", reason="older torch may lack Inductor's div_rn (division.py divides in float64 there)")
def test_this_torch_has_div_rn():
    """CI's torch (2.13) lowers fxquant::div_rn to Inductor's own div_rn."""
    assert HAS_DIV_RN


def test_cuda_graphs_keep_inductors_split_reductions():
    mode = torch._inductor.list_mode_options("reduce-overhead")
    settings = fxquant_inductor_settings(mode)
    assert "split_reductions" not in settings
    assert settings["triton.cudagraphs"] is True and settings["emulate_precision_casts"] is True


def test_global_cudagraphs_setting_counts_as_cuda_graphs():
    with torch._inductor.config.patch({"triton.cudagraphs": True}):
        assert "split_reductions" not in fxquant_inductor_settings({})


@pytest.mark.parametrize("how", ["options", "backend"])
def test_user_inductor_settings_reach_inductor_last(monkeypatch, how):
    seen = []

    def compile_fx(gm, inputs, config_patches):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(sys.modules["fxquant.backend"], "compile_fx", compile_fx)  # fxquant.backend is the function
    settings = {"split_reductions": True, "max_autotune_gemm": True}
    backend = fxquant.backend(inductor=settings) if how == "backend" else "fxquant"
    options = {"options": {"inductor": settings}} if how == "options" else {}
    model = torch.nn.Linear(64, 32)
    out = torch.compile(model, backend=backend, **options)(torch.randn(2, 64))
    assert out.shape == (2, 32)
    assert seen and all(patches.items() >= settings.items() for patches in seen)


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize(("shapes", "tokens"), [
    ([(1, 1, 64)], 1),  # one decode step: static
    ([(1, 1, 64), (16, 1, 64)], 16),  # the batch made dynamic: traced at 16
    ([(1, 1, 64), (2, 300, 64)], 600),  # prefill
])
def test_linear_tokens_reads_dynamos_sizes(shapes, tokens):
    backend = fxquant.backend(keep_graphs=True)
    compiled = torch.compile(TwoLinears(), backend=backend)
    for shape in shapes:
        compiled(torch.randn(shape))
    assert fxquant_settings.linear_tokens(backend.graphs[-1]) == tokens


@pytest.mark.parametrize("tokens", [1, 16, 17])
def test_moe_models_count_tokens_not_expert_rows(tokens):
    """Qwen3-MoE's experts see each token top-k times (2 here): the attention's linear layers say how
    many tokens the graph holds."""
    from tests.models import MOE_MODELS

    model = MOE_MODELS["qwen3_moe"]("grouped_mm", layers=1)
    backend = fxquant.backend(scheme="fp8_rowwise", keep_graphs=True)
    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(model, backend=backend)(torch.zeros(1, tokens, dtype=torch.long))
    graph = backend.graphs[-1]
    assert any(node.target is torch.ops.fxquant.fp8_rowwise_grouped_mm.default for node in graph.graph.nodes)
    assert fxquant_settings.linear_tokens(graph) == tokens


def test_decode_shaped_graphs_fuse_more():
    decode, prefill = fxquant_inductor_settings({}, tokens=16), fxquant_inductor_settings({}, tokens=17)
    assert decode["realize_opcount_threshold"] == fxquant_settings.DECODE_REALIZE_OPCOUNT_THRESHOLD
    assert "realize_opcount_threshold" not in prefill
