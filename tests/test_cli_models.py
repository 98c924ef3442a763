"""`fxquant quantize` on models that are not *ForCausalLM (fxquant/hf_model.py): the model is loaded
as the class config.json's `architectures` names, so heads, key prefixes and `architectures`
survive, and every tensor of the input is in the output under its name; weights that do not fit
the class, and a class transformers lacks, are errors before anything is written."""

import json
import os
import re

import pytest
import torch

from fxquant import QuantConfig
from fxquant.checkpoint import empty_weights, load_quantized, read_header, save_quantized
from fxquant.cli import main
from fxquant.hf_model import check_output_holds_input, tensor_names
from tests.models import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64))


def tiny_t5():
    config = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128)
    return transformers.T5ForConditionalGeneration(config)


def tiny_bert_classifier():
    config = transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, num_labels=3
    )
    return transformers.BertForSequenceClassification(config)


MODELS = {
    "GPT2LMHeadModel": tiny_gpt2,
    "T5ForConditionalGeneration": tiny_t5,
    "BertForSequenceClassification": tiny_bert_classifier,
    "LlamaForCausalLM": tiny_llama,
}


def saved(model: torch.nn.Module, path, **options):
    model.save_pretrained(path, **options)
    return path


@pytest.mark.parametrize("architecture", list(MODELS))
def test_the_class_config_json_names_is_quantized_with_its_head_and_names(architecture, tmp_path, capsys):
    torch.manual_seed(0)
    source, out = saved(MODELS[architecture]().eval(), tmp_path / "in"), tmp_path / "out"
    assert main(["quantize", str(source), str(out)]) == 0, capsys.readouterr().err

    metadata = json.loads((out / "fxquant.json").read_text())
    quantized = sum(entry["scheme"] is not None for entry in metadata["plan"])
    assert quantized > 0
    report = capsys.readouterr().out
    assert f"{out}: {architecture}, fp8_rowwise, {quantized} of {len(metadata['plan'])} linear layers quantized" in report
    if architecture == "GPT2LMHeadModel":  # Conv1D layers: transformers would read them back as float
        assert not (out / "config.json").exists()
        assert "config.json: none written: transformers converts nn.Linear only, not the quantized Conv1D layers" in report
    else:
        assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
        assert "config.json: quantization_config fbgemm_fp8" in report
    inputs, outputs = set(read_header(source / "model.safetensors")), set(read_header(out / "model.safetensors"))
    assert inputs - outputs - set(metadata["tied"]) == set(), "input tensors missing from the output"
    assert {name.removesuffix("_scale") for name in outputs - inputs} <= inputs, "only weight_scale tensors are new"


@pytest.mark.parametrize("architecture", ["T5ForConditionalGeneration", "BertForSequenceClassification", "LlamaForCausalLM"])
def test_transformers_loads_the_output_as_the_original_class(architecture, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    torch.manual_seed(0)
    source, out = saved(MODELS[architecture]().eval(), tmp_path / "in"), tmp_path / "out"
    assert main(["quantize", str(source), str(out), "--hf-format", "compressed-tensors"]) == 0, capsys.readouterr().err
    model, info = getattr(transformers, architecture).from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def tiny_vit_classifier():
    config = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8, num_labels=3)
    return transformers.ViTForImageClassification(config)


def tiny_qwen3_moe():
    config = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                         vocab_size=128, head_dim=16)
    return transformers.Qwen3MoeForCausalLM(config)


@pytest.mark.parametrize("make_model", [tiny_vit_classifier, tiny_qwen3_moe], ids=["ViT", "Qwen3-MoE"])
def test_a_model_transformers_renames_on_loading_keeps_every_tensor(make_model, tmp_path, capsys):
    """transformers 5 loads these under other names than their files hold (ViT's `attention.attention.query`
    is `attention.q_proj`; Qwen3-MoE's per-expert weights one fused tensor): the output holds each input
    tensor under the name transformers loads it as, and transformers and fxquant both load it."""
    torch.manual_seed(0)
    model = make_model().eval()
    source, out = saved(model, tmp_path / "in"), tmp_path / "out"
    on_disk = set(read_header(source / "model.safetensors"))
    assert on_disk != set(model.state_dict()), "transformers no longer renames this model: pick another"
    assert main(["quantize", str(source), str(out), "--scheme", "int8"]) == 0, capsys.readouterr().err
    assert re.search(r"\d+ of \d+ linear layers (and \d+ of \d+ expert weights )?quantized", capsys.readouterr().out)
    loaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    from fxquant import empty_weights, load_quantized

    with empty_weights():
        empty = type(model)(model.config)
    load_quantized(out, empty)


@pytest.mark.parametrize("layout", [{}, {"safe_serialization": False}, {"max_shard_size": "100KB"}],
                         ids=["safetensors", "pickle", "sharded"])
def test_input_tensor_names_are_read_from_each_weights_layout(layout, tmp_path, capsys):
    model = tiny_llama()
    source = saved(model, tmp_path / "in", **layout)
    assert tensor_names(source) == saved_names(source) and "model.norm.weight" in saved_names(source)
    assert main(["quantize", str(source), str(tmp_path / "out")]) == 0, capsys.readouterr().err


def saved_names(directory) -> set[str]:
    """The tensor names save_pretrained wrote, read with transformers' own loader."""
    from transformers.modeling_utils import load_state_dict

    files = [path for path in directory.iterdir() if path.suffix in (".safetensors", ".bin")]
    return {name for path in files for name in load_state_dict(str(path))}


def test_without_architectures_the_base_model_is_loaded_and_the_note_says_so(tmp_path, capsys):
    source = saved(tiny_llama().model, tmp_path / "in")  # LlamaModel: no head
    config = json.loads((source / "config.json").read_text())
    del config["architectures"]
    (source / "config.json").write_text(json.dumps(config))
    assert main(["quantize", str(source), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    assert "note: config.json names no architectures: loading the base model LlamaModel, without any head" in report
    assert f"{tmp_path / 'out'}: LlamaModel, fp8_rowwise, 14 of 14 linear layers quantized" in report


@pytest.mark.parametrize(
    "save, architecture, message",
    [
        (lambda: tiny_llama(), "LlamaForSequenceClassification",
         "holds tensors that LlamaForSequenceClassification has no place for: lm_head.weight"),
        (lambda: tiny_llama().model, "LlamaForCausalLM", "lacks tensors that LlamaForCausalLM needs (they would be random): lm_head.weight"),
        (lambda: tiny_bert_classifier().bert, "BertForSequenceClassification",
         "lacks tensors that BertForSequenceClassification needs (they would be random): classifier.bias, classifier.weight"),
        (lambda: tiny_llama(), "LlamaForNothing", "names 'LlamaForNothing', which transformers"),
        (lambda: tiny_llama(), "LlamaConfig", "names 'LlamaConfig', which transformers"),  # a transformers name, not a model
    ],
    ids=["head-without-weights", "weights-without-head", "base-weights-for-a-classifier", "unknown-class", "not-a-model"],
)
def test_weights_that_do_not_fit_the_named_class_are_an_error_before_writing(save, architecture, message, tmp_path, capsys):
    source = saved(save(), tmp_path / "in")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    assert main(["quantize", str(source), str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def table(model: torch.nn.Module, names: set[str]) -> dict[str, dict]:
    """fxquant.json's tensor table for `names` of `model`'s state dict."""
    state = model.state_dict()
    return {name: {"dtype": str(state[name].dtype).removeprefix("torch."), "shape": list(state[name].shape)} for name in names}


def test_an_input_tensor_missing_from_the_output_is_an_error_naming_it(tmp_path):
    model = tiny_llama()
    source = saved(model, tmp_path / "in")
    inputs = tensor_names(source)
    stored = inputs - {"model.norm.weight", "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"lacks tensors of .*: model.layers.1.mlp.up_proj.weight, model.norm.weight; "):
        check_output_holds_input(inputs, source, tmp_path / "out", model, table(model, stored), {})
    check_output_holds_input(inputs, source, tmp_path / "out", model, table(model, stored), {  # tied names are held
        "model.norm.weight": "x", "model.layers.1.mlp.up_proj.weight": "y"
    })


def test_a_buffer_the_model_computes_may_be_missing_from_the_output(tmp_path):
    """MiniLM's checkpoint holds embeddings.position_ids, which BertModel computes (non-persistent)."""
    config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    model = transformers.BertModel(config)
    assert "embeddings.position_ids" not in model.state_dict()
    inputs = set(model.state_dict()) | {"embeddings.position_ids"}
    check_output_holds_input(inputs, tmp_path, tmp_path / "out", model, table(model, set(model.state_dict())), {})



T5_WO = ["encoder.block.0.layer.1.DenseReluDense.wo", "encoder.block.1.layer.1.DenseReluDense.wo",
         "decoder.block.0.layer.2.DenseReluDense.wo", "decoder.block.1.layer.2.DenseReluDense.wo"]


def test_layers_transformers_keeps_in_float32_stay_float_and_fbgemm_fp8_names_them(tmp_path, capsys):
    """T5's `wo` (T5PreTrainedModel._keep_in_fp32_modules) stays an nn.Linear in every transformers quantizer:
    written float, and listed in fbgemm_fp8's modules_to_not_convert."""
    source, out = saved(tiny_t5().eval(), tmp_path / "in"), tmp_path / "out"
    assert main(["quantize", str(source), str(out), "--hf-format", "fbgemm_fp8"]) == 0, capsys.readouterr().err
    assert set(T5_WO) <= set(json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    header = read_header(out / "model.safetensors")
    assert all(header[f"{name}.weight"][0] == torch.float32 and f"{name}.weight_scale" not in header for name in T5_WO)
    assert header["encoder.block.0.layer.1.DenseReluDense.wi.weight"][0] == torch.float8_e4m3fn
    notes = {entry["layer"]: entry["note"] for entry in json.loads((out / "fxquant.json").read_text())["plan"]}
    assert all("T5ForConditionalGeneration._keep_in_fp32_modules" in notes[name] for name in T5_WO)


def test_fbgemm_fp8_is_refused_for_a_loaded_layer_transformers_would_keep_float(tmp_path, caplog):
    """A checkpoint whose `wo` is quantized (written for a model class without `_keep_in_fp32_modules`) loads
    with a warning naming it; saving it in fbgemm_fp8, whose loader would read `wo`'s e4m3 codes into a float
    Linear unscaled, is refused by name before anything is written."""
    torch.manual_seed(0)
    unguarded = tiny_t5().eval()
    unguarded._keep_in_fp32_modules = None
    save_quantized(unguarded, tmp_path / "in", QuantConfig(scheme="fp8_rowwise"))
    with empty_weights():
        loaded = type(unguarded)(unguarded.config)
    load_quantized(tmp_path / "in", loaded)
    assert "holds 'encoder.block.0.layer.1.DenseReluDense.wo' and 3 more quantized" in caplog.text
    assert "T5ForConditionalGeneration._keep_in_fp32_modules ['wo']" in caplog.text
    with pytest.raises(ValueError, match=r"fbgemm_fp8 leaves 'encoder.block.0.layer.1.DenseReluDense.wo' float .*\['wo'\]"):
        save_quantized(loaded, tmp_path / "out", QuantConfig(scheme="fp8_rowwise"), hf_format="fbgemm_fp8")
    assert not (tmp_path / "out").exists()
