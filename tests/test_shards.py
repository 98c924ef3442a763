"""Sharded checkpoints (fxquant/shards.py, checkpoint_writer.py, checkpoint_load.py): transformers'
split and names, an index transformers reads, loading one file at a time straight onto the device,
and every way a set of shards can be wrong refused before the model changes."""

import json

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

import fxquant
import fxquant.checkpoint_load
from fxquant import QuantConfig, empty_weights, load_quantized, save_quantized
from fxquant.shards import parse_size, split_into_shards
from tests.models import relative_error, tiny_llama, tiny_llama_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("size, expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), (" 1.5kb ", 1500), (1234, 1234)])
def test_sizes_read_as_transformers_reads_them(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 GiB", "lots", 0, "-1MB"])
def test_a_size_that_is_not_one_is_refused(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


@pytest.mark.parametrize("limit", ["30KB", "100KB", "1MB"])
def test_the_split_is_huggingface_hubs(limit):
    state = {name: t for name, t in tiny_llama().state_dict().items() if name != "lm_head.weight"}
    theirs = split_torch_state_dict_into_shards(state, max_shard_size=limit)
    ours = split_into_shards({name: t.numel() * t.element_size() for name, t in state.items()}, limit)
    assert [sorted(names) for names in ours] == [sorted(names) for names in theirs.filename_to_tensors.values()]


def saved(tmp_path, model, limit, **options):
    return save_quantized(model, tmp_path, QuantConfig(**options), max_shard_size=limit, hf_format="compressed-tensors")


def test_shards_and_index_load_like_one_file(tmp_path):
    model = tiny_llama()
    one = saved(tmp_path / "one", model, "50GB")
    many = saved(tmp_path / "many", model, "20KB")
    files = sorted(many["sha256"])
    assert len(files) >= 5 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: entry["file"] for name, entry in many["tensors"].items()}
    assert index["metadata"]["total_size"] == many["bytes"]["after"] == one["bytes"]["after"]
    assert sorted(many["files"]) == sorted([*files, "model.safetensors.index.json", "config.json", "fxquant.json"])
    joined = {}
    for file in files:
        joined.update(load_file(tmp_path / "many" / file))
    single = load_file(tmp_path / "one" / "model.safetensors")
    assert joined.keys() == single.keys()
    assert all(torch.equal(joined[n].view(torch.uint8), single[n].view(torch.uint8)) for n in single)

    with empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_llama_config())
    loaded = load_quantized(tmp_path / "many", empty)
    reference = load_quantized(tmp_path / "one", tiny_llama(seed=1))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "many")(ids).logits  # transformers reads the shards
        assert relative_error(theirs, reference(ids).logits) < 1e-5


def test_loading_opens_one_file_at_a_time_and_reads_onto_the_device(tmp_path, monkeypatch):
    saved(tmp_path, tiny_llama(), "20KB")
    opened, open_now, peak, devices = [], set(), [0], set()
    real = fxquant.checkpoint_load.safe_open

    class Spy:
        def __init__(self, path, framework, device="cpu"):
            self.path, self.inner = path, real(path, framework=framework, device=device)
            devices.add(device)

        def __enter__(self):
            opened.append(self.path)
            open_now.add(self.path)
            peak[0] = max(peak[0], len(open_now))
            return self.inner.__enter__()

        def __exit__(self, *exc):
            open_now.discard(self.path)
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(fxquant.checkpoint_load, "safe_open", Spy)
    with empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_llama_config())
    load_quantized(tmp_path, empty, device="cpu")
    assert peak[0] == 1 and len(opened) == len(set(opened)) >= 5 and devices == {"cpu"}


def snapshot(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def refused(directory, match):
    model = tiny_llama(seed=1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_quantized(directory, model)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


def test_a_tampered_or_missing_shard_is_refused_naming_it(tmp_path):
    second = sorted(saved(tmp_path, tiny_llama(), "20KB")["sha256"])[1]
    data = bytearray((tmp_path / second).read_bytes())
    data[-1] ^= 1
    (tmp_path / second).write_bytes(bytes(data))
    refused(tmp_path, rf"{second}: SHA-256 differs")
    (tmp_path / second).unlink()
    refused(tmp_path, rf"{second}: missing \(fxquant\.json lists it\)")


def test_an_index_that_disagrees_is_refused_naming_the_tensor(tmp_path):
    saved(tmp_path, tiny_llama(), "20KB")
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    path.write_text(json.dumps(index))
    refused(tmp_path, r"index\.json: tensor 'model\.norm\.weight' is in model-00009-of-00009\.safetensors there, in "
                      r"model-0000\d-of-0000\d\.safetensors by fxquant\.json")


def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path):
    metadata = saved(tmp_path, tiny_llama(), "20KB")
    first, second = sorted(metadata["sha256"])[:2]
    name = next(n for n, entry in metadata["tensors"].items() if entry["file"] == second)
    tensors = load_file(tmp_path / first)
    tensors[name] = load_file(tmp_path / second)[name]
    save_file(tensors, tmp_path / first, metadata={"format": "pt"})
    refused(tmp_path, rf"tensor '{name}' is in both .*{first} and .*{second}")


def test_a_format_1_checkpoint_still_loads(tmp_path):
    """Checkpoints written before shards: one model.safetensors, "sha256" a string, no per-layer bytes."""
    model = tiny_llama()
    metadata = save_quantized(model, tmp_path)
    path = tmp_path / "fxquant.json"
    old = {**metadata, "format_version": 1, "sha256": metadata["sha256"]["model.safetensors"],
           "tensors": {name: {"dtype": e["dtype"], "shape": e["shape"]} for name, e in metadata["tensors"].items()},
           "plan": [{key: value for key, value in entry.items() if key != "bytes"} for entry in metadata["plan"]]}
    path.write_text(json.dumps(old))
    loaded = load_quantized(tmp_path, tiny_llama(seed=1))
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, load_quantized(tmp_path, tiny_llama(seed=2), verify_checksum=False)(ids).logits)
