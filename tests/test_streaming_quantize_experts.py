"""`fxquant quantize` streams MoE models (fxquant/streaming_quantize.py): an HF directory that holds the
experts one tensor per expert (as save_pretrained writes them and users download them) is read,
quantized and written expert by expert into the per-expert output layout, byte for byte what
save_quantized of the model transformers loads writes; one expert in memory at a time."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fxquant import QuantConfig, save_quantized
from fxquant import streaming_quantize
from fxquant.cli import main
from fxquant.hf_model import load_model, model_class, read_config
from tests.moe_models import build, mixtral_config, qwen3_moe_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

MODELS = {"qwen3_moe": qwen3_moe_config(width=128, expert_width=128), "mixtral": mixtral_config(width=128, expert_width=128)}


def saved(tmp_path, model_name):
    model = build(MODELS[model_name], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "in", max_shard_size="300KB")
    return tmp_path / "in"


def weights(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if "safetensors" in path.name}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("scheme", ["fp8_rowwise", "fp8_blockwise", "int8"])
def test_per_expert_inputs_stream_into_what_save_quantized_writes(tmp_path, model_name, scheme, capsys):
    source = saved(tmp_path, model_name)
    assert any(".experts.0." in name for name in json.loads((source / "model.safetensors.index.json").read_text())["weight_map"])
    streamed = tmp_path / "streamed"
    assert main(["quantize", str(source), str(streamed), "--scheme", scheme, "--max-shard-size", "200KB", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "loaded whole" not in out
    assert ("and 2 of 2 expert weights quantized" if scheme != "int8" else "and 0 of 2 expert weights quantized") in out
    config = read_config(source)
    model = load_model(source, model_class(config)[0], config)
    reference = json.loads(json.dumps(save_quantized(model, tmp_path / "loaded", QuantConfig(scheme=scheme), max_shard_size="200KB")))
    assert weights(streamed) == weights(tmp_path / "loaded")  # bit for bit, index included
    metadata = json.loads((streamed / "fxquant.json").read_text())
    assert {k: v for k, v in metadata.items() if k != "files"} == {k: v for k, v in reference.items() if k != "files"}


def test_each_expert_is_read_and_quantized_alone(tmp_path, monkeypatch):
    """Every piece of a planned expert weight stands for one expert and reads only that expert's tensors."""
    source = saved(tmp_path, "qwen3_moe")
    config = read_config(source)
    plan = streaming_quantize.streaming_plan(source, model_class(config)[0], config, QuantConfig())
    pieces, _, _ = streaming_quantize._pieces(plan)
    expert_pieces = [piece for piece in pieces if any(".experts." in name for name in piece.layout)]
    assert len(expert_pieces) == 2 * 4  # gate_up_proj and down_proj, 4 experts each
    read = []
    real_read = streaming_quantize.read_tensor
    monkeypatch.setattr(streaming_quantize, "read_tensor", lambda path, name: read.append(name) or real_read(path, name))
    for piece in expert_pieces:
        read.clear()
        made = piece.make()
        experts = {name.split(".experts.")[1].split(".")[0] for name in [*made, *read]}
        assert len(experts) == 1, f"a piece touched experts {experts}"
        assert piece.source_bytes == 2 * 256 * 128 if "gate_proj" in "".join(made) else 2 * 128 * 128


def test_a_per_expert_input_of_the_wrong_shape_is_named(tmp_path, capsys):
    source = saved(tmp_path, "qwen3_moe")
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    tensors = load_file(source / index[name])
    tensors[name] = tensors[name][:64].contiguous()
    save_file(tensors, source / index[name], metadata={"format": "pt"})
    assert main(["quantize", str(source), str(tmp_path / "out")]) != 0
    assert (f"{index[name]}: tensor '{name}' is torch.bfloat16 [64, 128]; model.layers.0.mlp.experts.gate_up_proj "
            "[4, 256, 128] needs float16, bfloat16 or float32 [128, 128] per expert and part") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_input_transformers_renames_streams_under_the_models_names(tmp_path, capsys):
    """ViT's files hold `attention.attention.query` where the model has `attention.q_proj`: read through
    transformers' renamings, streamed, the bytes save_quantized writes for the loaded model."""
    from tests.test_cli_models import saved as save_pretrained
    from tests.test_cli_models import tiny_vit_classifier

    torch.manual_seed(0)
    source = save_pretrained(tiny_vit_classifier().eval(), tmp_path / "in")
    assert main(["quantize", str(source), str(tmp_path / "streamed")]) == 0
    assert "loaded whole" not in capsys.readouterr().out
    config = read_config(source)
    save_quantized(load_model(source, model_class(config)[0], config), tmp_path / "loaded", QuantConfig())
    assert weights(tmp_path / "streamed") == weights(tmp_path / "loaded")
