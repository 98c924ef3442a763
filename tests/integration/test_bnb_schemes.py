"""nf4, fp4 and llm_int8 through every way in: the backend (Inductor), fxquant.export, save_quantized
and load_quantized (eager and compiled), and `fxquant quantize` on a tiny Llama. The reference is
the layer's own formula on the scheme's tensors (tests/ops/ check those against bitsandbytes)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import QuantConfig, empty_weights, load_quantized, save_quantized
from fxquant.cli import main
from fxquant.ops.blockwise_4bit import dequantize_4bit
from tests.models import tiny_llama

SCHEMES = ["nf4", "fp4", "llm_int8"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 64, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def reference_linear(scheme: str, layer: nn.Linear, x: torch.Tensor, options) -> torch.Tensor:
    tensors = fxquant.SCHEMES[scheme].quantize(layer.weight.detach(), options)
    if scheme == "llm_int8":
        return torch.ops.fxquant.llm_int8_linear(x, tensors["weight"], tensors["weight_absmax"], layer.bias, options.threshold)
    weight = dequantize_4bit(tensors["weight"], tensors["weight_absmax"], tensors["weight_nested_absmax"],
                             tensors["weight_offset"], scheme, options.blocksize)
    return F.linear(x, weight.to(x.dtype), layer.bias)


def reference_block(model: Block, x: torch.Tensor, scheme: str, options) -> torch.Tensor:
    return reference_linear(scheme, model.down, F.silu(reference_linear(scheme, model.up, x, options)), options)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compile_export_save_load(scheme, tmp_path):
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 128)
    config = QuantConfig(scheme=scheme)
    options = fxquant.SCHEMES[scheme].options({})
    with torch.no_grad():
        expected = reference_block(model, x, scheme, options)
        float_output = model(x)
        assert 0 < (expected - float_output).norm() / float_output.norm() < 0.15  # quantized, not broken

        backend = fxquant.backend(config)
        torch.testing.assert_close(torch.compile(model, backend=backend)(x), expected)
        assert [entry.scheme for entry in backend.plans[0]] == [scheme, scheme]

        program = fxquant.export(model, (x,), config=config)
        torch.testing.assert_close(program.module()(x), expected)
        assert "up.weight" not in program.state_dict

    save_quantized(model, tmp_path / "model", config)
    with empty_weights():
        loaded = Block()
    load_quantized(tmp_path / "model", loaded)
    assert loaded.up.weight.dtype == (torch.int8 if scheme == "llm_int8" else torch.uint8)
    with torch.no_grad():
        eager = loaded(x)
        torch.testing.assert_close(eager, expected)
        torch.testing.assert_close(torch.compile(loaded, backend=fxquant.backend(config))(x), eager)

    # the loaded model (the nf4 / fp4 weight packed [N, K / 2]) saves its stored tensors back as they
    # are, and its plan says each layer's [N, K]
    save_quantized(loaded, tmp_path / "again", config)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()
    plans = [json.loads((tmp_path / name / "fxquant.json").read_text())["plan"] for name in ("model", "again")]
    assert [row["shape"] for row in plans[1]] == [row["shape"] for row in plans[0]] == [[256, 128], [64, 256]]
    fxquant.quantize_(model, config)  # quantized in place: the same tensors
    save_quantized(model, tmp_path / "in_place", config)
    assert (tmp_path / "in_place" / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()


def test_options_reach_the_op():
    torch.manual_seed(1)
    model, x = Block().eval(), torch.randn(2, 128)
    config = QuantConfig(scheme="nf4", scheme_options={"nf4": {"blocksize": 128, "compute_dtype": "bfloat16"}})
    backend = fxquant.backend(config, keep_graphs=True)
    with torch.no_grad():
        y = torch.compile(model, backend=backend)(x)
    code = backend.graphs[0].code
    assert "fxquant.linear_4bit.default" in code and "'nf4', 128, 'bfloat16'" in code
    assert y.dtype == torch.float32
    with pytest.raises(ValueError, match="blocksize must be one of"):
        QuantConfig(scheme="nf4", scheme_options={"nf4": {"blocksize": 100}})
    with pytest.raises(ValueError, match="threshold must be"):
        QuantConfig(scheme="llm_int8", scheme_options={"llm_int8": {"threshold": -1}})


def test_a_k_not_divisible_by_the_blocksize_is_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(96, 32))
    plan = fxquant.plan(model, torch.randn(2, 96), config=QuantConfig(scheme="nf4"))
    assert [entry.note for entry in plan] == ["K=96 not divisible by the 4-bit blocksize 64"]


def test_cli_quantize_nf4_tiny_llama(tmp_path, capsys):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "in")
    assert main(["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--scheme", "nf4", "--quiet"]) == 0
    assert "nf4, 14 of 15 linear layers quantized" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "out" / "fxquant.json").read_text())
    assert metadata["tensors"]["model.layers.0.mlp.up_proj.weight_absmax"]["dtype"] == "uint8"
    with empty_weights():
        loaded = type(model)(model.config)
    load_quantized(tmp_path / "out", loaded)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits, float_logits = loaded(ids).logits, model(ids).logits
    assert torch.isfinite(logits).all() and 0 < (logits - float_logits).norm() / float_logits.norm() < 0.2
