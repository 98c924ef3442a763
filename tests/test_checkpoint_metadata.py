"""fxquant.json is checked, not trusted (fxquant/checkpoint.py, fxquant/checkpoint_schema.py): a
malformed file, a missing checksum, a tensor table or tied map that disagrees with the weights
file or the model is an error naming the file and the entry, with the model left unchanged; a
tensor stored in another dtype is refused where it is quantized; config.json describes the
numerics the checkpoint was made with (fxquant/hf_formats.py)."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fxquant.checkpoint import empty_weights, load_quantized, read_metadata, save_quantized
from fxquant.config import QuantConfig
from fxquant.footprint import dtype_name
from tests.models import MLP, tiny_llama, tiny_llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(dim=128, hidden=256, vocab=32).eval()


def snapshot(model: nn.Module) -> dict:
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[name].dtype == t.dtype and torch.equal(after[name], t) for name, t in before.items())


def edit_metadata(directory, edit) -> None:
    path = directory / "fxquant.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


def rewrite(directory, edit_tensors, edit_metadata_too=None) -> None:
    """Change the weights file as a tool that keeps the checkpoint consistent would: the tensor
    table and the SHA-256 in fxquant.json follow, so only the checks against the model can object."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit_tensors(tensors)
    save_file(tensors, path, metadata={"format": "pt"})

    def follow(metadata):
        metadata["tensors"] = {n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "file": "model.safetensors"}
                               for n, t in tensors.items()}
        metadata["sha256"] = {"model.safetensors": hashlib.sha256(path.read_bytes()).hexdigest()}
        if edit_metadata_too:
            edit_metadata_too(metadata)

    edit_metadata(directory, follow)


def refused(directory, model, match) -> None:
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_quantized(directory, model)
    assert_unchanged(model, before)


# The checksum is required; only verify_checksum=False skips comparing it.


@pytest.mark.parametrize("value", [None, "", "abc", "0" * 63, "A" * 64, 12, ["0" * 64]])
def test_missing_or_malformed_sha256_is_refused(tmp_path, value):
    save_quantized(mlp(), tmp_path)
    edit_metadata(tmp_path, lambda m: m.update(sha256={"model.safetensors": value}))
    refused(tmp_path, mlp(seed=1), r"fxquant: .*fxquant\.json: sha256 is .*, expected a map from each weights file to its SHA-256")
    edit_metadata(tmp_path, lambda m: m.update(sha256=value))
    refused(tmp_path, mlp(seed=1), r"fxquant: .*fxquant\.json: sha256 is .*, expected a map from each weights file to its SHA-256")


def test_deleted_sha256_is_refused_even_without_verification(tmp_path):
    save_quantized(mlp(), tmp_path)
    edit_metadata(tmp_path, lambda m: m.pop("sha256"))
    for verify in (True, False):
        with pytest.raises(ValueError, match=r"fxquant\.json: the file lacks 'sha256'"):
            load_quantized(tmp_path, mlp(seed=1), verify_checksum=verify)


def test_verify_checksum_false_is_an_explicit_opt_out(tmp_path):
    save_quantized(mlp(), tmp_path)
    path = tmp_path / "model.safetensors"
    original = {name: t.clone() for name, t in load_file(path).items()}
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data: the header is intact
    path.write_bytes(bytes(data))
    refused(tmp_path, mlp(seed=1), "SHA-256 differs")
    loaded = load_quantized(tmp_path, mlp(seed=1), verify_checksum=False).state_dict()
    changed = [name for name, t in original.items() if not torch.equal(loaded[name].view(torch.uint8), t.view(torch.uint8))]
    assert len(changed) == 1, "the changed bytes are loaded as they are"


# A malformed fxquant.json: "fxquant: <path>: <what is wrong>", never a bare KeyError / TypeError.

MALFORMED = {
    "plan shape of three": (lambda m: m["plan"][0].update(shape=[1, 2, 3]), r"plan\[0\]\.shape is \[1, 2, 3\], expected 2 positive integers"),
    "plan shape zero": (lambda m: m["plan"][1].update(shape=[0, 128]), r"plan\[1\]\.shape is \[0, 128\], expected 2 positive"),
    "plan entry without scheme": (lambda m: m["plan"][1].pop("scheme"), r"plan\[1\] lacks 'scheme'"),
    "plan entry a string": (lambda m: m["plan"].__setitem__(0, "up"), r"plan\[0\] is 'up', expected a map"),
    "plan a map": (lambda m: m.update(plan={"up": "fp8_rowwise"}), r"plan is a map, expected a list"),
    "plan layer a number": (lambda m: m["plan"][0].update(layer=3), r"plan\[0\]\.layer is 3, expected a string"),
    "tensors a list": (lambda m: m.update(tensors=list(m["tensors"])), r"tensors is \[.*, expected a map"),
    "tensor shape a string": (lambda m: m["tensors"]["up.weight"].update(shape="256x128"), r"tensors\.up\.weight\.shape is '256x128'"),
    "tensor entry without dtype": (lambda m: m["tensors"]["up.bias"].pop("dtype"), r"tensors\.up\.bias lacks 'dtype'"),
    "tied a list": (lambda m: m.update(tied=[]), r"tied is \[\], expected a map"),
    "tied to a number": (lambda m: m.update(tied={"lm_head.weight": 1}), r"tied\.lm_head\.weight is 1, expected a string"),
    "config a list": (lambda m: m.update(config=["fp8_rowwise"]), r"config is \['fp8_rowwise'\], expected a map"),
    "config skip a number": (lambda m: m["config"].update(skip=5), r"config\.skip is 5, expected a list"),
    "config bound a string": (lambda m: m["config"].update(activation_scale_ub="big"), r"config\.activation_scale_ub is 'big', expected a number or null"),
    "config block of one": (lambda m: m["config"].update(weight_block_size=[128]), r"config\.weight_block_size is \[128\], expected 2 positive"),
    "config min numel a float": (lambda m: m["config"].update(min_weight_numel=1.5), r"config\.min_weight_numel is 1\.5, expected an integer"),
    "config flag a string": (lambda m: m["config"].update(check_weight_updates="yes"), r"config\.check_weight_updates is 'yes', expected a boolean"),
    "config unknown option": (lambda m: m["config"].update(colour="red"), r"unknown option\(s\) colour"),
    "config negative numel": (lambda m: m["config"].update(min_weight_numel=-1), r"min_weight_numel must be >= 0"),
    "bytes missing": (lambda m: m.pop("bytes"), r"the file lacks 'bytes'"),
    "bytes after a string": (lambda m: m["bytes"].update(after="1 MB"), r"bytes\.after is '1 MB', expected an integer"),
    "format_version a string": (lambda m: m.update(format_version="1"), r"format_version '1' unsupported"),
    "format_version 3": (lambda m: m.update(format_version=3), r"format_version 3 unsupported \(this fxquant reads 1 and 2\)"),
    "an empty map": (lambda m: m.clear(), r"format_version None unsupported"),
    "files a string": (lambda m: m.update(files="model.safetensors"), r"files is 'model\.safetensors', expected a list"),
    "plan lists a layer twice": (lambda m: m["plan"].append(dict(m["plan"][0])), r"the plan lists layer 'up' twice"),
    "plan quantizes a layer without a scale": (lambda m: m["tensors"].pop("up.weight_scale"), r"the plan quantizes layer 'up' \(fp8_rowwise\), but the tensor table has no 'up\.weight_scale'"),
    "tied alias also stored": (lambda m: m.update(tied={"up.bias": "up.weight_scale"}), r"tied maps 'up\.bias' to 'up\.weight_scale', but the tensor table holds 'up\.bias'"),
    "tied to nothing": (lambda m: m.update(tied={"other.weight": "nowhere.weight"}), r"tied maps 'other\.weight' to 'nowhere\.weight', but the tensor table has no 'nowhere\.weight'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_fxquant_json_names_the_file_and_the_entry(tmp_path, case):
    edit, message = MALFORMED[case]
    save_quantized(mlp(), tmp_path)
    edit_metadata(tmp_path, edit)
    refused(tmp_path, mlp(seed=1), rf"^fxquant: {tmp_path / 'fxquant.json'}: {message}")
    with pytest.raises(ValueError, match=rf"^fxquant: {tmp_path / 'fxquant.json'}: {message}"):
        read_metadata(tmp_path)  # what `fxquant inspect` reads


@pytest.mark.parametrize(
    "text, message",
    [("", "not a JSON file"), ("{", "not a JSON file"), ("not json", "not a JSON file"), ("\xff\xfe", "not a JSON file"),
     ("[1]", "format_version None unsupported"), ('"fxquant"', "format_version None unsupported")],
)
def test_unreadable_fxquant_json(tmp_path, text, message):
    save_quantized(mlp(), tmp_path)
    (tmp_path / "fxquant.json").write_bytes(text.encode("latin-1"))
    refused(tmp_path, mlp(seed=1), rf"fxquant\.json: {message}")


# The tensor table must be the weights file's; the file's dtypes must be the model's.


@pytest.mark.parametrize(
    "name, dtype",
    [("up.weight_scale", torch.bfloat16), ("up.weight", torch.int8), ("lm_head.weight", torch.float16), ("up.bias", torch.float64)],
)
def test_a_file_that_differs_from_its_table_is_refused(tmp_path, name, dtype):
    save_quantized(mlp(), tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = tensors[name].view(dtype) if dtype.itemsize == tensors[name].dtype.itemsize else tensors[name].to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    refused(tmp_path, mlp(seed=1), rf"model\.safetensors: tensor '{name}' is {dtype} .*; fxquant\.json records ")


# Found by mutation testing: a tensor whose dtype changed but not its shape, file and table alike.

QUANTIZED_DTYPE_CHANGES = {
    "fp8 weight stored as int8": ("fp8_rowwise", "up.weight", lambda t: t.view(torch.int8), "torch.float8_e4m3fn"),
    "fp8 weight stored as e5m2": ("fp8_rowwise", "down.weight", lambda t: t.float().to(torch.float8_e5m2), "torch.float8_e4m3fn"),
    "fp8 weight stored as uint8": ("fp8_blockwise", "up.weight", lambda t: t.view(torch.uint8), "torch.float8_e4m3fn"),
    "fp32 scale stored as bf16": ("fp8_rowwise", "up.weight_scale", lambda t: t.to(torch.bfloat16), "torch.float32"),
    "tensorwise scale stored as fp16": ("fp8_tensorwise", "down.weight_scale", lambda t: t.to(torch.float16), "torch.float32"),
    "int8 weight stored as uint8": ("int8", "down.weight", lambda t: t.view(torch.uint8), "torch.int8"),
    "int8 weight stored as e4m3": ("int8", "up.weight", lambda t: t.view(torch.float8_e4m3fn), "torch.int8"),
    "int8 scale stored as fp64": ("int8", "up.weight_scale", lambda t: t.to(torch.float64), "torch.float32"),
    "float lm_head stored as e4m3": ("fp8_rowwise", "lm_head.weight", lambda t: t.to(torch.float8_e4m3fn), "float16, bfloat16, float32 or float64"),
    "float bias stored as int32": ("int8", "up.bias", lambda t: t.to(torch.int32), "float16, bfloat16, float32 or float64"),
}


@pytest.mark.parametrize("case", list(QUANTIZED_DTYPE_CHANGES))
def test_tensor_of_another_dtype_is_refused_where_its_dtype_is_fixed(tmp_path, case):
    scheme, name, change, wanted = QUANTIZED_DTYPE_CHANGES[case]
    save_quantized(mlp(), tmp_path, QuantConfig(scheme=scheme))
    rewrite(tmp_path, lambda tensors: tensors.update({name: change(tensors[name])}))
    refused(tmp_path, mlp(seed=1), rf"model\.safetensors: tensor '{name}' is torch\.\w+ \[.*\]; the model needs {wanted}, shape")


@pytest.mark.parametrize("name, dtype", [("lm_head.weight", torch.bfloat16), ("up.bias", torch.float16), ("lm_head.weight", torch.float64)])
def test_unquantized_float_tensor_in_another_float_dtype_loads_as_stored(tmp_path, name, dtype):
    """A checkpoint saved from a bf16 model loads into a model built in fp32 (what from_config and
    empty_weights give) as stored: no cast, so neither its values nor its footprint change."""
    save_quantized(mlp(), tmp_path)
    rewrite(tmp_path, lambda tensors: tensors.update({name: tensors[name].to(dtype)}))
    stored = load_file(tmp_path / "model.safetensors")[name]
    for model in (mlp(seed=1), _empty_mlp()):
        loaded = load_quantized(tmp_path, model).state_dict()[name]
        assert loaded.dtype == dtype and torch.equal(loaded, stored)


def _empty_mlp() -> MLP:
    with empty_weights():
        return MLP(dim=128, hidden=256, vocab=32)


class WithStepBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.register_buffer("steps", torch.arange(4, dtype=torch.int64))


def test_non_float_tensor_must_keep_its_dtype(tmp_path):
    save_quantized(WithStepBuffer(), tmp_path, QuantConfig(skip=[]))
    rewrite(tmp_path, lambda tensors: tensors.update(steps=tensors["steps"].to(torch.int32)))
    refused(tmp_path, WithStepBuffer(), r"tensor 'steps' is torch\.int32 \[4\]; the model needs torch\.int64")


# tied names a tie the model really has.


def o_proj_runs_q_proj(metadata):
    metadata["tied"]["model.layers.0.self_attn.o_proj.weight"] = "model.layers.0.self_attn.q_proj.weight"


def layer_1_runs_layer_0(metadata):
    for kind in ("weight", "weight_scale"):
        metadata["tied"][f"model.layers.1.mlp.up_proj.{kind}"] = f"model.layers.0.mlp.up_proj.{kind}"


def head_is_an_embedding_it_is_not(metadata):
    metadata["tied"]["lm_head.weight"] = "model.embed_tokens.weight"


TIED_EDITS = {
    "o_proj runs q_proj": (o_proj_runs_q_proj, ["model.layers.0.self_attn.o_proj.weight"], "model.layers.0.self_attn.o_proj.weight"),
    "a layer runs another's weights and scale": (
        layer_1_runs_layer_0, ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight_scale"],
        "model.layers.1.mlp.up_proj.weight",
    ),
    "an untied head made tied": (head_is_an_embedding_it_is_not, ["lm_head.weight"], "lm_head.weight"),
}


@pytest.mark.parametrize("case", list(TIED_EDITS))
@pytest.mark.parametrize("on_meta", [False, True])
def test_tied_map_edited_to_alias_another_tensor_is_refused(tmp_path, case, on_meta):
    edit, dropped, alias = TIED_EDITS[case]
    save_quantized(tiny_llama(), tmp_path, QuantConfig(skip=[]) if "head" not in case else QuantConfig())
    rewrite(tmp_path, lambda tensors: [tensors.pop(name) for name in dropped], edit)
    if on_meta:
        with empty_weights():
            model = transformers.LlamaForCausalLM(tiny_llama_config())
        with pytest.raises(ValueError, match=rf"fxquant\.json: tied says '{alias}' is stored as .*a tensor of its own"):
            load_quantized(tmp_path, model)
        assert all(p.is_meta for p in model.parameters())
    else:
        refused(tmp_path, tiny_llama(seed=1), rf"fxquant\.json: tied says '{alias}' is stored as '.*', but the model's '{alias}' is a tensor of its own")


def tied_llama():
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_real_ties_load_on_meta_and_real_models_and_edits_of_them_are_refused(tmp_path):
    metadata = save_quantized(tied_llama(), tmp_path)
    assert metadata["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    with empty_weights():
        on_meta = transformers.LlamaForCausalLM(tied_llama().config)
    for model in (on_meta, tied_llama()):
        loaded = load_quantized(tmp_path, model)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    edit_metadata(tmp_path, lambda m: m.update(tied={"lm_head.weight": "model.norm.weight", "missing.weight": "model.norm.weight"}))
    refused(tmp_path, tied_llama(), r"tied says 'lm_head\.weight' is stored as 'model\.norm\.weight'.*a tensor of its own")
    edit_metadata(tmp_path, lambda m: m.update(tied={"missing.weight": "model.norm.weight"}))
    refused(tmp_path, tied_llama(), r"tied says 'missing\.weight' is stored as 'model\.norm\.weight', but the model's 'missing\.weight' is no tensor")
    edit_metadata(tmp_path, lambda m: m.update(tied={}))  # the head then has no tensor in the file
    refused(tmp_path, tied_llama(), r"does not fit the model .*missing \['lm_head\.weight'\]")


# config.json describes the numerics fxquant computed with.

FLOAT32_MAX = torch.finfo(torch.float32).max


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("ub, recorded", [(None, FLOAT32_MAX), (2.0, 2.0), (1200.0, 1200.0), (1e6, 1e6)])
def test_fbgemm_fp8_config_records_the_bound_fxquant_computed_with(tmp_path, ub, recorded):
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear

    metadata = save_quantized(tiny_llama(), tmp_path, QuantConfig(activation_scale_ub=ub))
    written = strict_json((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["activation_scale_ub"] == recorded == metadata["quantization_config"]["activation_scale_ub"]
    assert strict_json((tmp_path / "fxquant.json").read_text())["config"]["activation_scale_ub"] == ub

    # transformers fills each FbgemmFp8Linear's float32 input_scale_ub from the config
    # (FbgemmFp8HfQuantizer._process_model_after_weight_loading); vLLM makes a float32 tensor of it.
    hf_config = transformers.FbgemmFp8Config.from_dict(transformers.AutoConfig.from_pretrained(tmp_path).quantization_config)
    layer = FbgemmFp8Linear(64, 64, bias=False)
    layer.input_scale_ub.fill_(hf_config.activation_scale_ub)
    vllm_bound = torch.tensor(hf_config.activation_scale_ub, dtype=torch.float32)
    assert torch.equal(layer.input_scale_ub, vllm_bound.reshape(1)) and torch.isfinite(vllm_bound)
    amax = torch.tensor([0.0, 1.0, 3.0, 1500.0, 3e38], dtype=torch.float32)
    expected = amax if ub is None else amax.clamp(max=ub)  # fxquant's min(amax, ub), or no bound
    assert torch.equal(torch.minimum(amax, layer.input_scale_ub), expected)


def test_compressed_tensors_refuses_a_bound_it_cannot_record(tmp_path):
    for scheme, ub in (("fp8_rowwise", 2.0), ("fp8_blockwise", 1200.0)):
        config = QuantConfig(scheme=scheme, activation_scale_ub=ub, weight_block_size=(32, 32))
        with pytest.raises(ValueError, match=rf"compressed-tensors cannot record activation_scale_ub={ub:g}: .*activation_scale_ub=None"):
            save_quantized(tiny_llama(), tmp_path / "out", config, hf_format="compressed-tensors")
        assert not (tmp_path / "out").exists()
    compressed_tensors = pytest.importorskip("compressed_tensors")
    for scheme in ("fp8_rowwise", "fp8_blockwise", "int8"):
        config = QuantConfig(scheme=scheme, weight_block_size=(32, 32))
        save_quantized(tiny_llama(), tmp_path / scheme, config, hf_format="compressed-tensors")
        written = strict_json((tmp_path / scheme / "config.json").read_text())["quantization_config"]
        parsed = compressed_tensors.QuantizationConfig.model_validate(written)
        assert parsed.config_groups["group_0"].input_activations.dynamic is True and parsed.ignore == ["lm_head"]


def test_fxquant_json_lists_the_files_of_the_save(tmp_path):
    for name, model, config in [("hf", tiny_llama(), QuantConfig()), ("tensorwise", tiny_llama(), QuantConfig(scheme="fp8_tensorwise")),
                                ("plain", mlp(), QuantConfig())]:
        metadata = save_quantized(model, tmp_path / name, config)
        assert sorted(metadata["files"]) == sorted(os.listdir(tmp_path / name))
        assert metadata["files"] == (["model.safetensors", "config.json", "fxquant.json"] if name == "hf"
                                     else ["model.safetensors", "fxquant.json"])
