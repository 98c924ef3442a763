"""Per-layer rules (QuantConfig.rules, fxquant/config.py): the first matching glob decides a layer's
scheme (or leaves it unquantized) over `skip` and `scheme`; the plan names the rule; compiled layers
compute what their scheme alone computes; merge stacks only layers of one scheme; a mixed checkpoint
saves and loads (its config.json: compressed-tensors' mixed-precision layout, where every scheme has
one, tests/test_compressed_tensors.py; none otherwise)."""

import json

import pytest
import torch
from torch import nn

import fxquant
from fxquant import QuantConfig, empty_weights, load_quantized, save_quantized
from fxquant.cli import main
from tests.models import tiny_llama, tiny_llama_config

RULES = {"*.down_proj": "int8", "*.gate_proj": "fp8_blockwise", "*.k_proj": None, "lm_head": "fp8_tensorwise"}
CONFIG = QuantConfig(scheme="fp8_rowwise", rules=RULES, weight_block_size=(32, 32))  # layers no rule names: FP8 on every device


def test_rules_parse_from_a_dict_or_pairs_and_are_checked():
    assert CONFIG.rules == tuple(RULES.items())
    options = {"scheme": "fp8_rowwise", "rules": [list(pair) for pair in RULES.items()], "weight_block_size": [32, 32]}
    assert QuantConfig.from_options(options) == CONFIG
    with pytest.raises(ValueError, match="unknown scheme 'fp3'"):
        QuantConfig(rules={"*": "fp3"})
    with pytest.raises(ValueError, match="rules must map glob strings"):
        QuantConfig(rules=[("*",)])
    # an option applies when a rule's scheme declares it
    assert QuantConfig(scheme="int8", rules={"x": "fp8_rowwise"}, activation_scale_ub=8.0).activation_scale_ub == 8.0


def test_plan_rows_name_the_deciding_rule():
    model, ids = tiny_llama(layers=1), torch.randint(0, 128, (1, 5))
    plan = fxquant.plan(model, ids, config=CONFIG)
    rows = {e.layer.removeprefix("model.layers.0."): (e.scheme, e.note, e.rule) for e in plan}
    assert rows == {
        "self_attn.q_proj": ("fp8_rowwise", "one GEMM with v_proj", None),
        "self_attn.k_proj": (None, "skipped by rule (*.k_proj)", "*.k_proj"),
        "self_attn.v_proj": ("fp8_rowwise", "one GEMM with q_proj", None),
        "self_attn.o_proj": ("fp8_rowwise", "", None),
        "mlp.gate_proj": ("fp8_blockwise", "rule '*.gate_proj'", "*.gate_proj"),  # not merged with up_proj: another scheme
        "mlp.up_proj": ("fp8_rowwise", "", None),
        "mlp.down_proj": ("int8", "rule '*.down_proj'", "*.down_proj"),
        "lm_head": ("fp8_tensorwise", "rule 'lm_head'", "lm_head"),  # a rule wins over the skip list
    }


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_each_layer_computes_what_its_scheme_alone_computes():
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(6, 64)
    rules = {"a": "int8", "b": "fp8_blockwise", "c": None}  # d: the config's scheme, fp8_tensorwise
    config = QuantConfig(scheme="fp8_tensorwise", skip=(), rules=rules, weight_block_size=(32, 32))
    with torch.no_grad():
        actual = torch.compile(model, backend=fxquant.backend(config))(x)
        h = x
        for name, scheme in (("a", "int8"), ("b", "fp8_blockwise"), ("c", None), ("d", "fp8_tensorwise")):
            layer = getattr(model, name)
            if scheme is not None:
                torch._dynamo.reset()
                alone = QuantConfig(scheme=scheme, skip=(), weight_block_size=(32, 32))
                layer = torch.compile(layer, backend=fxquant.backend(alone))
            h = layer(h) if name == "d" else torch.relu(layer(h))
    assert torch.equal(actual, h)
    counters = torch._dynamo.utils.counters["fxquant"]
    assert [counters[f"{s}_linear"] >= 1 for s in ("int8", "fp8_blockwise", "fp8_tensorwise")] == [True] * 3


def test_a_mixed_checkpoint_saves_and_loads(tmp_path, capsys):
    model, ids = tiny_llama(), torch.randint(0, 128, (1, 6))
    with pytest.raises(ValueError, match="compressed-tensors has no dynamic fp8_tensorwise layout"):  # lm_head's
        save_quantized(model, tmp_path / "ct", CONFIG, hf_format="compressed-tensors")
    metadata = save_quantized(model, tmp_path / "out", CONFIG)
    assert "config.json" not in metadata["files"] and "quantization_config" not in metadata
    schemes = {e["layer"]: e["scheme"] for e in metadata["plan"]}
    assert schemes["model.layers.1.mlp.down_proj"] == "int8" and schemes["model.layers.1.self_attn.k_proj"] is None
    assert metadata["tensors"]["model.layers.1.mlp.gate_proj.weight_scale"]["shape"] == [4, 2]  # 32 x 32 blocks
    assert metadata["tensors"]["lm_head.weight_scale"]["shape"] == []
    main(["inspect", str(tmp_path / "out")])
    assert "schemes: fp8_rowwise (8 layers), fp8_blockwise (2 layers), int8 (2 layers), fp8_tensorwise (1 layer)" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "fxquant.json").read_text())
    assert written["config"]["rules"] == [list(pair) for pair in RULES.items()]

    with empty_weights():
        loaded = type(model)(tiny_llama_config())
    load_quantized(tmp_path / "out", loaded)
    assert loaded.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert loaded.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32
    with torch.no_grad():
        expected = torch.compile(model, backend=fxquant.backend(CONFIG))(ids).logits
        eager = loaded(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(loaded, backend=fxquant.backend(CONFIG))(ids).logits
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)


def test_malformed_rules_in_fxquant_json_are_an_error_naming_the_entry(tmp_path):
    save_quantized(tiny_llama(layers=1), tmp_path, QuantConfig(rules={"*.down_proj": "int8"}))
    metadata = json.loads((tmp_path / "fxquant.json").read_text())
    metadata["config"]["rules"] = [["*.down_proj"]]
    (tmp_path / "fxquant.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"config\.rules\[0\] is \['\*\.down_proj'\], expected a \[glob, scheme or null\] pair"):
        load_quantized(tmp_path, tiny_llama(layers=1))
