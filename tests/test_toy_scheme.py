"""A scheme is one plugin (fxquant/scheme.py): this file alone defines and registers a scheme fxquant
has never seen, weight-only int8 with a per-row scale AND a per-row zero point (three named
tensors, an option, its own op), and takes it through plan, compile (with merge), export and a
checkpoint's save and load, with no edit to fxquant. The reference is torch's own affine fake
quantization, with the qparams of torch.ao's PerChannelMinMaxObserver."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver

import fxquant
from fxquant import QuantConfig, Scheme, SchemeCall, empty_weights, load_quantized, register_scheme, save_quantized, unregister_scheme

NAME = "toy_int8_zp"


def dequantized_linear(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ ((w_q - zero_point) * scale).T + bias, the weight dequantized per row."""
    weight = (w_q.float() - zero_point.float()[:, None]) * scale[:, None]
    return F.linear(x, weight.to(x.dtype), bias)


@torch.library.custom_op("fxquant_toy::int8_zp_linear", mutates_args=())
def int8_zp_linear(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    return dequantized_linear(x, w_q, scale, zero_point, bias)


@int8_zp_linear.register_fake
def _(x, w_q, scale, zero_point, bias=None):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@dataclass(frozen=True)
class ToyOptions:
    bits: int = 8  # codes in [-2^(bits-1), 2^(bits-1) - 1], held in int8

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"fxquant: {NAME}: bits must be 2..8, got {self.bits}")


def code_range(options: ToyOptions) -> tuple[int, int]:
    return -(1 << (options.bits - 1)), (1 << (options.bits - 1)) - 1


class ToyInt8ZeroPoint(Scheme):
    name = NAME
    tensors = {"weight": torch.int8, "weight_scale": torch.float32, "weight_zero_point": torch.int32}
    Options = ToyOptions
    merge_dims = {"weight": 0, "weight_scale": 0, "weight_zero_point": 0}

    def quantize(self, weight, options):
        low, high = code_range(options)
        w = weight.float()
        w_min, w_max = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = ((w_max - w_min) / (high - low)).clamp(min=torch.finfo(torch.float32).eps)
        zero_point = (low - torch.round(w_min / scale)).clamp(low, high).to(torch.int32)
        codes = (torch.round(w * (1.0 / scale[:, None])) + zero_point[:, None]).clamp(low, high)
        return {"weight": codes.to(torch.int8), "weight_scale": scale, "weight_zero_point": zero_point}

    def decompositions(self):  # on CUDA Inductor fuses the dequantization into the GEMM's operand load
        return {torch.ops.fxquant_toy.int8_zp_linear.default: dequantized_linear}

    def call(self, layer, x, tensors, bias, options, values=None):
        return SchemeCall(
            torch.ops.fxquant_toy.int8_zp_linear.default,
            {"x": x, "w_q": tensors["weight"], "scale": tensors["weight_scale"],
             "zero_point": tensors["weight_zero_point"], "bias": bias},
            {"weight": "w_q", "weight_scale": "scale", "weight_zero_point": "zero_point"},
        )


@pytest.fixture(autouse=True)
def toy_scheme():
    register_scheme(ToyInt8ZeroPoint())
    yield
    unregister_scheme(NAME)


def reference_linear(linear: nn.Linear, x: torch.Tensor, bits: int) -> torch.Tensor:
    """torch's per-channel affine fake quantization of the weight, with the observer's qparams."""
    low, high = code_range(ToyOptions(bits))
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_affine,
                                        quant_min=low, quant_max=high)
    observer(linear.weight.detach())
    scale, zero_point = observer.calculate_qparams()
    weight = torch.fake_quantize_per_channel_affine(linear.weight.detach(), scale.float(), zero_point.int(), 0, low, high)
    return F.linear(x, weight, linear.bias)


class Block(nn.Module):
    """gate and up share an input and have no bias (one GEMM when merged); down has a bias; head stays float."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(64, 96, bias=False)
        self.up = nn.Linear(64, 96, bias=False)
        self.down = nn.Linear(96, 64)
        self.lm_head = nn.Linear(64, 32)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x)
        return self.lm_head(self.down(h))


def reference_block(model: Block, x: torch.Tensor, bits: int) -> torch.Tensor:
    h = F.silu(reference_linear(model.gate, x, bits)) * reference_linear(model.up, x, bits)
    return model.lm_head(reference_linear(model.down, h, bits))


def toy_config() -> QuantConfig:
    """The toy scheme with 6-bit codes (made while it is registered)."""
    return QuantConfig(scheme=NAME, scheme_options={NAME: {"bits": 6}})


def test_the_registry_knows_it_and_validates_its_options():
    assert NAME in fxquant.SCHEMES and toy_config().options_for(NAME) == ToyOptions(6)
    with pytest.raises(ValueError, match="bits must be 2..8, got 9"):
        QuantConfig(scheme=NAME, scheme_options={NAME: {"bits": 9}})
    with pytest.raises(ValueError, match="toy_int8_zp has no option.s. group; its options: bits"):
        QuantConfig(scheme=NAME, scheme_options={NAME: {"group": 2}})
    with pytest.raises(ValueError, match="already registered"):
        register_scheme(ToyInt8ZeroPoint())


def test_plan_and_compile_with_merge():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(5, 64)
    plan = fxquant.plan(model, x, config=toy_config())
    assert [(e.layer, e.scheme, e.note) for e in plan] == [
        ("gate", NAME, "one GEMM with up"), ("up", NAME, "one GEMM with gate"), ("down", NAME, ""),
        ("lm_head", None, "skipped by skip list (lm_head)"),
    ]
    backend = fxquant.backend(toy_config(), keep_graphs=True)
    with torch.no_grad():
        actual = torch.compile(model, backend=backend)(x)
        expected = reference_block(model, x, bits=6)
    torch.testing.assert_close(actual, expected)
    assert not torch.allclose(actual, model(x), atol=1e-3), "the weights must be quantized (6 bits)"
    counters = torch._dynamo.utils.counters["fxquant"]
    assert counters[f"{NAME}_linear"] == 3 and counters["merged_linears"] == 2
    graph = backend.graphs[0]
    assert graph.fxquant_gate_merged_zero_point.shape == (192,) and graph.fxquant_gate_merged_weight.dtype == torch.int8


def test_options_are_part_of_the_quantized_weight_cache_key():
    """The graphs of one model share quantized copies by the scheme's cache key: another option, another copy."""
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 64)
    with torch.no_grad():
        for bits in (6, 4):
            torch._dynamo.reset()
            config = QuantConfig(scheme=NAME, scheme_options={NAME: {"bits": bits}})
            torch.testing.assert_close(torch.compile(model, backend=fxquant.backend(config))(x), reference_block(model, x, bits))


def test_export_and_checkpoint_save_load(tmp_path):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 64)
    expected = reference_block(model, x, bits=6)
    program = fxquant.export(model, (x,), config=toy_config())
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected)
    assert program.state_dict["fxquant_down_zero_point"].dtype == torch.int32
    assert "down.weight" not in program.state_dict

    metadata = save_quantized(model, tmp_path / "model", toy_config())
    assert metadata["tensors"]["down.weight_zero_point"] == {"dtype": "int32", "shape": [64], "file": "model.safetensors"}
    assert "config.json" not in metadata["files"]  # no HF layout describes the toy scheme
    save_quantized(program, tmp_path / "program")
    assert (tmp_path / "program" / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()

    with empty_weights():
        loaded = Block()
    load_quantized(tmp_path / "model", loaded)
    assert loaded.down.weight.dtype == torch.int8 and loaded.down.weight_zero_point.dtype == torch.int32
    with torch.no_grad():
        eager = loaded(x)
        torch.testing.assert_close(eager, expected)
        backend = fxquant.backend(toy_config())
        assert torch.equal(torch.compile(loaded, backend=backend)(x), eager)
    # stored as loaded, and the stored gate and up still run as one GEMM on their stacked tensors
    assert [e.note for e in backend.plans[0].rewritten] == [
        "stored quantized weights; one GEMM with up", "stored quantized weights; one GEMM with gate", "stored quantized weights"]
    save_quantized(loaded, tmp_path / "again", toy_config())
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()


def test_its_decomposition_joins_inductors_table_at_the_next_compile():
    """Registered after `import fxquant` installed the built-ins' decompositions: the backend installs
    the toy's before it compiles; off CUDA it declines, so the op runs whole."""
    from torch._inductor.decomposition import select_decomp_table

    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        torch.compile(model, backend=fxquant.backend(QuantConfig(scheme=NAME)))(torch.randn(2, 64))
    decomposition = select_decomp_table()[torch.ops.fxquant_toy.int8_zp_linear.default]
    w_q, scale, zero_point = torch.zeros(64, 64, dtype=torch.int8), torch.ones(64), torch.zeros(64, dtype=torch.int32)
    assert decomposition(torch.randn(2, 64), w_q, scale, zero_point) is NotImplemented
