"""Checkpoints into a tensor-parallel model (fxquant/checkpoint_slices.py): two processes on gloo, TP = 2.

A tiny Llama is saved by `save_quantized` in this process; each rank builds it (on the meta device,
or float with other weights), parallelizes it as torchtitan does (column-wise q/k/v/gate/up, row-wise
o/down) and loads the checkpoint through a safe_open that counts what it reads. One spawn runs every
case (starting processes and compiling dominate) and saves what each rank saw; the tests read it.
References: the same TP model compiled from the float weights (fxquant quantizes each rank's slice
of the whole weight's tensors when compiling: the loaded model must be bit-equal to it), and the
single-process model loaded from the same checkpoint (its tensors, sliced, bit-equal; its logits
within FP8's per-rank activation error, as tests/integration/test_tensor_parallel.py states it)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

RANKS = 2
pytest.importorskip("torch.distributed.tensor")

# name: (QuantConfig arguments, shard size for save_quantized)
CHECKPOINTS = {
    "fp8_rowwise": ({"scheme": "fp8_rowwise"}, None),
    "int8 shards": ({"scheme": "int8"}, 40_000),
    "fp8_blockwise 16": ({"scheme": "fp8_blockwise", "weight_block_size": (16, 16)}, None),
    "fp8_blockwise 32": ({"scheme": "fp8_blockwise", "weight_block_size": (32, 32)}, None),  # k_proj's 16-row shards
    "nf4": ({"scheme": "nf4"}, None),  # no shard_dims
}
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _llama(seed: int = 0):
    """tests.models' tiny Llama with biases in its attention and MLP layers, eval mode, fp32."""
    from transformers import LlamaForCausalLM

    from tests.models import tiny_llama_config

    config = tiny_llama_config()
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _parallel_llama(mesh, meta: bool, seed: int = 0):
    """_llama (built on meta, or float from `seed`), q/k/v/gate/up column-wise, o/down row-wise, as
    torchtitan splits it: the embedding by vocab rows, lm_head (left float) column-wise."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import fxquant

    if meta:
        with fxquant.empty_weights():
            model = _llama()
    else:
        model = _llama(seed)
    for layer in model.model.layers:
        parallelize_module(layer.self_attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                   "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
        parallelize_module(layer.mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                             "down_proj": RowwiseParallel()})
    parallelize_module(model, mesh, {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),  # vocab rows
                                     "lm_head": ColwiseParallel(output_layouts=Replicate())})
    return model


class _CountingSafeOpen:
    """safetensors' safe_open, recording each read: {name: ("whole" or "slice", elements)}."""

    def __init__(self, reads: dict, *args, **kwargs):
        from safetensors import safe_open

        self.reads, self.file = reads, safe_open(*args, **kwargs)

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *error):
        return self.file.__exit__(*error)

    def get_tensor(self, name):
        tensor = self.file.get_tensor(name)
        self.reads[name] = ("whole", tensor.numel())
        return tensor

    def get_slice(self, name):
        whole, reads = self.file.get_slice(name), self.reads

        class Part:
            def __getitem__(self, index):
                tensor = whole[index]
                reads[name] = ("slice", tensor.numel())
                return tensor

        return Part()


def _compiled(model, config):
    import fxquant

    torch._dynamo.reset()
    backend = fxquant.backend(config)
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(TOKENS).logits
    return logits, backend.plans[-1]


def _load(directory, model) -> tuple[object, dict]:
    """`model` loaded from `directory`, and what each rank read of it."""
    import fxquant
    from fxquant import checkpoint_load

    reads, real = {}, checkpoint_load.safe_open
    checkpoint_load.safe_open = lambda *args, **kwargs: _CountingSafeOpen(reads, *args, **kwargs)
    try:
        return fxquant.load_quantized(directory, model), reads
    finally:
        checkpoint_load.safe_open = real


def _held(model) -> dict:
    """The state dict, {name: (placement, local tensor)} of a DTensor, else (None, tensor)."""
    from fxquant.tensor_parallel import is_dtensor

    return {name: (str(t.placements[0]), t.to_local()) if is_dtensor(t) else (None, t) for name, t in model.state_dict().items()}


def _rows_48():
    """One int8 layer of 48 rows: 24 per rank, which the kernels' 16-alignment refuses."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))


def _cases(directory: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import fxquant

    mesh = init_device_mesh("cpu", (RANKS,))
    seen = {}
    for name, meta in (("fp8_rowwise", True), ("int8 shards", False), ("fp8_blockwise 16", True)):
        config = fxquant.QuantConfig(**CHECKPOINTS[name][0])
        loaded, seen[f"{name} reads"] = _load(os.path.join(directory, name), _parallel_llama(mesh, meta, seed=5))
        seen[f"{name} held"] = _held(loaded)
        with torch.no_grad():
            seen[f"{name} eager"] = loaded(TOKENS).logits
        seen[f"{name} logits"], plan = _compiled(loaded, config)
        seen[f"{name} notes"] = [entry.note for entry in plan.rewritten]
        seen[f"{name} plan"] = str(plan)
        seen[f"{name} copies"] = len(fxquant.quantized_copies(loaded))
        seen[f"{name} quantized when compiling"], _ = _compiled(_parallel_llama(mesh, meta=False), config)
    refused = {name: _parallel_llama(mesh, meta=True) for name in ("fp8_blockwise 32", "nf4")}
    with fxquant.empty_weights():
        refused["int8 48 rows"] = _rows_48()
    parallelize_module(refused["int8 48 rows"], mesh, {"0": ColwiseParallel()})
    for name, model in refused.items():
        try:
            fxquant.load_quantized(os.path.join(directory, name), model)
        except ValueError as error:
            seen[f"{name} refused"] = str(error)
        seen[f"{name} left"] = {n: (str(t.dtype), t.is_meta) for n, t in model.state_dict().items()}
    return seen


def _worker(rank: int, directory: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=RANKS)
    try:
        torch.save(_cases(directory), os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(what each rank saw, {checkpoint: (single-process logits, its loaded state dict)})."""
    import fxquant

    directory = tmp_path_factory.mktemp("tp_checkpoint")
    single = {}
    for name, (arguments, shard_size) in CHECKPOINTS.items():
        config = fxquant.QuantConfig(**arguments)
        fxquant.save_quantized(_llama(), directory / name, config, **({"max_shard_size": shard_size} if shard_size else {}))
        if name in ("fp8_blockwise 32", "nf4"):
            continue
        with fxquant.empty_weights():
            loaded = fxquant.load_quantized(directory / name, _llama())
        single[name] = (_compiled(loaded, config)[0], loaded.state_dict())
    fxquant.save_quantized(_rows_48(), directory / "int8 48 rows", fxquant.QuantConfig(scheme="int8"))
    mp.spawn(_worker, args=(str(directory),), nprocs=RANKS)
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)], single, directory


LOADED = ["fp8_rowwise", "int8 shards", "fp8_blockwise 16"]


def test_the_sharded_checkpoint_has_several_files(run):
    _, _, directory = run
    assert len(list((directory / "int8 shards").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("name", LOADED)
def test_each_rank_holds_its_slice_of_the_single_process_tensors(run, name):
    """Column-wise layers: rows of the weight and of its per-channel or block scales; row-wise layers:
    columns of the weight, the whole per-channel scale, columns of the block scales."""
    ranks, single, _ = run
    state = single[name][1]
    for rank, seen in enumerate(ranks):
        held = seen[f"{name} held"]
        assert held.keys() == state.keys()
        for tensor_name, (placement, local) in held.items():
            whole = state[tensor_name]
            expected = whole if placement in (None, "R") else whole.chunk(RANKS, int(placement[2:-1]))[rank]
            assert local.dtype == whole.dtype and torch.equal(local.view(torch.uint8), expected.view(torch.uint8)), tensor_name
        row_wise, column_wise = "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj"
        assert held[f"{column_wise}.weight"][0] == held[f"{column_wise}.weight_scale"][0] == "S(0)"
        assert held[f"{row_wise}.weight"][0] == "S(1)"
        assert held[f"{row_wise}.weight_scale"][0] == ("S(1)" if "blockwise" in name else "R")
        assert held["model.layers.0.mlp.up_proj.weight"][1].dtype == state["model.layers.0.mlp.up_proj.weight"].dtype != torch.float32


@pytest.mark.parametrize("name", LOADED)
def test_each_rank_reads_only_what_it_holds(run, name):
    """Every tensor split over ranks is read through get_slice, as many elements as the rank holds;
    only tensors whole on every rank are read whole."""
    for seen in run[0]:
        reads, held = seen[f"{name} reads"], seen[f"{name} held"]
        assert reads.keys() == held.keys()
        for tensor_name, (placement, local) in held.items():
            how = "slice" if placement is not None and placement.startswith("S") else "whole"
            assert reads[tensor_name] == (how, local.numel()), tensor_name
        for plain in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias"):
            assert held[plain][0] == "S(0)" and reads[plain][0] == "slice", plain  # not quantized, split all the same
        assert held["model.layers.0.self_attn.o_proj.bias"][0] == "R"


@pytest.mark.parametrize("name", LOADED)
def test_the_loaded_tp_model_runs_its_stored_tensors_as_quantizing_when_compiling_does(run, name):
    """Bit-equal to the TP model quantized when compiled (each rank's slice of the whole weight's
    tensors, the same op); within 0.05 of the single-process loaded model (the row-wise layers'
    activations are quantized per rank slice: 0.026 for fp8_rowwise, 0.006 for int8 here). Eagerly
    (StoredLinear's forward: fxquant's ops on DTensors) within 1e-5 of compiled (1.5e-7 seen)."""
    ranks, single, _ = run
    for rank, seen in enumerate(ranks):
        logits = seen[f"{name} logits"]
        torch.testing.assert_close(logits, seen[f"{name} quantized when compiling"], rtol=0, atol=0)
        reference = single[name][0]
        assert (logits - reference).norm() / reference.norm() < 0.05
        torch.testing.assert_close(seen[f"{name} eager"], logits, rtol=0, atol=1e-5)  # fxquant's ops on DTensors, uncompiled
        notes = seen[f"{name} notes"]
        assert len(notes) == 14 and all(note.startswith("stored quantized weights; ") for note in notes)
        assert seen[f"{name} copies"] == 0  # nothing quantized again
        assert "14 of 15 linear layers quantized" in seen[f"{name} plan"]
        assert f"row-wise: K {rank * 64}-{rank * 64 + 63} on rank {rank} of 2" in seen[f"{name} plan"]  # down_proj


@pytest.mark.parametrize(("name", "reason"), [
    ("fp8_blockwise 32", ("cannot read layer 'model.layers.0.self_attn.k_proj' slice by slice into the tensor-parallel "
                          "model: column-wise shard 16 x 64: N=16 not a multiple of the 32-wide weight block")),
    ("nf4", ("cannot read layer 'model.layers.0.self_attn.q_proj' slice by slice into the tensor-parallel model: "
             "nf4 does not say how its tensors split (shard_dims)")),
    ("int8 48 rows", ("cannot read layer '0' slice by slice into the tensor-parallel model: column-wise shard 24 x 64: "
                      "N=24 not divisible by 16")),
])
def test_a_split_that_does_not_fit_is_refused_before_anything_is_assigned(run, name, reason):
    for seen in run[0]:
        assert reason in seen[f"{name} refused"]
        left = seen[f"{name} left"]  # every tensor still float on the meta device, no scale added
        assert left and all(v == ("torch.float32", True) for v in left.values())
