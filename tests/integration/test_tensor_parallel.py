"""Tensor parallelism on the CPU (fxquant/tensor_parallel.py): two processes on gloo, TP = 2.

One spawn runs every case in both ranks (starting processes and compiling dominate) and saves what
each rank saw; the tests read it. References: the single-process model compiled with fxquant, and the
float64 formulas of tests/ops/formula_reference.py for the row-wise layer, whose activation each rank
quantizes over its own slice of K (as vLLM does)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.ops.formula_reference import quantize_fp8

RANKS = 2
pytest.importorskip("torch.distributed.tensor")


def _compiled(model, tokens, backend):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend)(tokens)


class _Heads(torch.nn.Module):
    """Four layers on one input: a and c read as parallelize_module's default leaves them (`.to_local()`),
    b as a DTensor where it is one, gathered whole; d (under TP, its input rows gathered) on its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(256, 512, bias=False) for _ in range(4))

    def forward(self, x):
        from torch.distributed.tensor import DTensor

        b = self.b(x)
        return torch.cat([self.a(x), b.full_tensor() if isinstance(b, DTensor) else b, self.c(x)], -1), self.d(x)


def _node_counts(gm) -> dict[str, int]:
    """fxquant's FP8 ops and DTensor's framing (from_local, redistribute) in a compiled graph."""
    from torch.distributed.tensor import DTensor

    nodes = list(gm.graph.nodes)
    return {"ops": sum(node.target is torch.ops.fxquant.fp8_rowwise_linear.default for node in nodes),
            "from_local": sum(node.target is DTensor.from_local for node in nodes),
            "redistribute": sum(node.op == "call_method" and node.target == "redistribute" for node in nodes)}


def _cases(rank: int, directory: str) -> dict:
    import fxquant
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import AutoModelForCausalLM

    from tests.models import tiny_llama

    mesh = init_device_mesh("cpu", (RANKS,))
    FP8 = fxquant.QuantConfig(scheme="fp8_rowwise")  # the formulas below are FP8's (auto is int8 on the CPU)
    seen = {}

    # One column-wise and one row-wise layer, as parallelize_module leaves them.
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 256, bias=False))
    x = torch.randn(5, 256)
    single = fxquant.backend(FP8)
    seen["mlp single"] = _compiled(copy.deepcopy(mlp), x, single)
    seen["mlp hidden single"] = _compiled(copy.deepcopy(mlp[0]), x, fxquant.backend(FP8))
    parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    backend = fxquant.backend(FP8)
    seen["mlp"] = _compiled(mlp, x, backend)
    seen["mlp hidden"] = _compiled(mlp[0], x, fxquant.backend(FP8))  # this rank's columns (use_local_output)
    seen["mlp plan"] = str(backend.plans[-1])
    seen["mlp weights"] = {name: mlp[i].weight.full_tensor() for i, name in ((0, "0"), (1, "1"))}
    seen["local tensors"] = [{name: (t.placements[0], t.to_local()) for name, t in copy.tensors.items()}
                             for copy in fxquant.quantized_copies(mlp)]

    # fp8_blockwise: each rank's shard must be whole 128 x 128 blocks, else the layer is skipped.
    for name, (hidden_size, inner) in {"wide blockwise plan": (256, 512), "narrow blockwise plan": (256, 128)}.items():
        torch.manual_seed(0)
        blocks = torch.nn.Sequential(torch.nn.Linear(hidden_size, inner, bias=False), torch.nn.Linear(inner, hidden_size, bias=False))
        parallelize_module(blocks, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
        blockwise = fxquant.backend(fxquant.QuantConfig(scheme="fp8_blockwise"))
        _compiled(blocks, x, blockwise)
        seen[name] = str(blockwise.plans[-1])

    # A scheme that does not declare how its tensors split (nf4's absmax runs over flattened rows).
    torch.manual_seed(0)
    nf4 = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 256, bias=False))
    parallelize_module(nf4, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    nf4_backend = fxquant.backend(fxquant.QuantConfig(scheme="nf4"))
    _compiled(nf4, x, nf4_backend)
    seen["nf4 plan"] = str(nf4_backend.plans[-1])

    # Column-wise layers on one input; b's output is read as a DTensor, d's input is all-gathered (Shard(0)).
    torch.manual_seed(0)
    heads = _Heads()
    seen["heads single"] = _compiled(copy.deepcopy(heads), x, fxquant.backend(FP8))[0]
    parallelize_module(heads, mesh, {"a": ColwiseParallel(), "b": ColwiseParallel(use_local_output=False),
                                     "c": ColwiseParallel(), "d": ColwiseParallel(input_layouts=Shard(0))})
    heads_backend = fxquant.backend(FP8)
    seen["heads"] = _compiled(heads, x, heads_backend)[0]
    seen["heads plan"] = str(heads_backend.plans[-1])

    # A tiny Llama: parallelize_module as torchtitan does, and transformers' own tp_plan="auto".
    model = tiny_llama()
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    seen["llama single"] = _compiled(copy.deepcopy(model), tokens, fxquant.backend(FP8)).logits
    with torch.no_grad():
        seen["llama float"] = model(tokens).logits
    for layer in model.model.layers:
        parallelize_module(layer.self_attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                   "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
        parallelize_module(layer.mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                             "down_proj": RowwiseParallel()})
    backend = fxquant.backend(FP8, keep_graphs=True)
    seen["llama"] = _compiled(model, tokens, backend).logits
    seen["llama plan"] = str(backend.plans[-1])
    seen["llama nodes"] = _node_counts(backend.graphs[-1])
    unmerged = fxquant.backend(fxquant.QuantConfig(scheme="fp8_rowwise", merge_parallel_linears=False), keep_graphs=True)
    seen["llama unmerged"] = _compiled(model, tokens, unmerged).logits  # the copies merged above, unstacked
    seen["llama unmerged nodes"] = _node_counts(unmerged.graphs[-1])
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(directory, "llama"), tp_plan="auto").eval()
    backend = fxquant.backend(FP8)
    compiled = torch.compile(hf, backend=backend)
    with torch.no_grad():
        seen["llama tp_plan"] = compiled(tokens).logits
        seen["llama tp_plan plan"] = str(backend.plans[-1])
        # A weight changed after compiling: re-quantized into the merged q/k/v stack's local views.
        hf.model.layers[0].self_attn.k_proj.weight.mul_(0.5)
        seen["llama tp_plan changed"] = compiled(tokens).logits
    seen["requantized"] = torch._dynamo.utils.counters["fxquant"]["requantized_weights"]
    seen["llama tp_plan recompiled"] = _compiled(hf, tokens, fxquant.backend(FP8)).logits
    return seen


def _worker(rank: int, directory: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(RANKS), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=RANKS)
    try:
        torch.save(_cases(rank, directory), os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from tests.models import tiny_llama

    directory = tmp_path_factory.mktemp("tp")
    tiny_llama().save_pretrained(directory / "llama")
    mp.spawn(_worker, args=(str(directory),), nprocs=RANKS)
    return [torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)]


def test_a_column_wise_layer_computes_the_single_process_columns_bit_for_bit(ranks):
    for rank, seen in enumerate(ranks):
        expected = seen["mlp hidden single"].chunk(RANKS, -1)[rank]
        torch.testing.assert_close(seen["mlp hidden"], expected, rtol=0, atol=0)


def test_each_rank_holds_its_slice_of_the_single_process_quantized_tensors(ranks):
    """Codes and scales of the whole weight (float64 formulas), each rank its slice: rows of the
    column-wise layer with their scales, columns of the row-wise one with every row's scale."""
    weights = ranks[0]["mlp weights"]
    for rank, seen in enumerate(ranks):
        for layer, (name, dim) in enumerate((("0", 0), ("1", 1))):
            codes, _, scale = quantize_fp8(weights[name], dims=(1,))
            (weight_placement, local_codes), (scale_placement, local_scale) = (
                seen["local tensors"][layer]["weight"], seen["local tensors"][layer]["weight_scale"])
            assert str(weight_placement) == f"S({dim})" or getattr(weight_placement, "dim", None) == dim
            assert torch.equal(local_codes.view(torch.uint8).long(), codes.chunk(RANKS, dim)[rank])
            if dim == 0:  # column-wise: each rank its rows' scales
                assert getattr(scale_placement, "dim", None) == 0
                assert torch.equal(local_scale.double(), scale.squeeze(1).chunk(RANKS, 0)[rank])
            else:  # row-wise: every row's scale, over all of K, on each rank
                assert scale_placement.is_replicate()
                assert torch.equal(local_scale.double(), scale.squeeze(1))


def test_a_row_wise_layer_sums_each_ranks_quantized_slice(ranks):
    """y = sum over ranks r of q(h_r) q(W_r)^T * s(h_r) s(W): the activation quantized per token over
    the rank's slice of K, the weight per output channel over all of K; float32 sums."""
    weights = ranks[0]["mlp weights"]
    hidden = torch.cat([seen["mlp hidden"] for seen in ranks], -1)
    _, w_values, w_scale = quantize_fp8(weights["1"], dims=(1,))
    expected = torch.zeros(hidden.shape[0], weights["1"].shape[0], dtype=torch.float64)
    for part, w_part in zip(hidden.chunk(RANKS, -1), w_values.chunk(RANKS, -1)):
        _, x_values, x_scale = quantize_fp8(part, dims=(1,))
        expected += (x_values @ w_part.T) * x_scale * w_scale.T
    for seen in ranks:
        actual = seen["mlp"].double()
        assert ((actual - expected).norm() / expected.norm()).item() < 1e-6
        # and close to the single process, whose activation is quantized over all of K
        assert ((actual - seen["mlp single"].double()).norm() / expected.norm()).item() < 0.05


def test_the_plan_says_which_part_each_rank_holds(ranks):
    assert "column-wise: N 0-255 on rank 0 of 2" in ranks[0]["mlp plan"]
    assert "column-wise: N 256-511 on rank 1 of 2" in ranks[1]["mlp plan"]
    assert "row-wise: K 256-511 on rank 1 of 2" in ranks[1]["mlp plan"]
    assert "2 of 2 linear layers quantized" in ranks[0]["mlp plan"]


def test_blockwise_shards_need_whole_blocks_and_a_scheme_must_say_how_it_splits(ranks):
    for seen in ranks:
        assert "2 of 2 linear layers quantized" in seen["wide blockwise plan"]  # shards 256 x 256
        plan = seen["narrow blockwise plan"]
        assert "column-wise shard 64 x 256: N=64 not a multiple of the 128-wide weight block" in plan
        assert "row-wise shard 256 x 64: K=64 not a multiple of the 128-wide weight block" in plan
        assert "0 of 2 linear layers quantized" in plan
        assert "nf4 does not say how its tensors split (shard_dims)" in seen["nf4 plan"]
        assert "0 of 2 linear layers quantized" in seen["nf4 plan"]


@pytest.mark.parametrize("path", ["llama", "llama tp_plan"], ids=["parallelize_module", "transformers tp_plan"])
def test_a_tensor_parallel_llama_computes_what_one_process_does(ranks, path):
    """Within FP8's own error: the single process is 0.037 from the float model on this model; the
    row-wise layers' activations are quantized per rank slice, so the two differ by about as much."""
    for rank, seen in enumerate(ranks):
        actual, single, float_logits = seen[path], seen["llama single"], seen["llama float"]
        assert (actual - single).norm() / single.norm() < 0.05
        assert (actual - float_logits).norm() / float_logits.norm() < 0.06
        plan = seen[f"{path} plan"]
        assert "14 of 15 linear layers quantized" in plan
        assert f"row-wise: K {rank * 64}-{rank * 64 + 63} on rank {rank} of 2" in plan  # down_proj, K = 128
    torch.testing.assert_close(ranks[0]["llama"], ranks[0]["llama tp_plan"], rtol=1e-5, atol=1e-5)


def test_transformers_tp_layers_merge_and_a_changed_weight_is_requantized_into_the_stack(ranks):
    """transformers' layers read `w.to_local()`: q/k/v and gate/up run as one GEMM on each rank's
    stacked local parts, and a weight changed after compiling is re-quantized there (its slice of
    the whole weight's tensors), as a fresh compile of the changed model computes."""
    for seen in ranks:
        assert "column-wise: N 0-31 on rank 0 of 2; one GEMM with k_proj, v_proj" in ranks[0]["llama tp_plan plan"]
        assert seen["requantized"] >= 1
        assert not torch.equal(seen["llama tp_plan changed"], seen["llama tp_plan"])
        torch.testing.assert_close(seen["llama tp_plan changed"], seen["llama tp_plan recompiled"], rtol=0, atol=0)


def test_parallelize_module_layers_merge_on_the_local_activation(ranks):
    """Column-wise q/k/v and gate/up run as one GEMM per group on each rank's local activation and
    stacked local shards; the row-wise layers keep their framing and all-reduces. The merged model
    computes the un-merged TP model's logits to the bit (each output column is the same dot product
    on the same codes), and the single process's within the test above's tolerance."""
    for rank, seen in enumerate(ranks):
        plan = seen["llama plan"]
        assert plan.count("one GEMM with k_proj, v_proj") == 2  # q_proj, one per layer
        assert plan.count("one GEMM with up_proj") == 2  # gate_proj
        assert f"column-wise: N {rank * 32}-{rank * 32 + 31} on rank {rank} of 2; one GEMM with k_proj, v_proj" in plan
        assert "one GEMM" not in "".join(line for line in plan.splitlines() if "o_proj" in line or "down_proj" in line)
        # per layer: qkv, o, gate_up, down; 2 layers (lm_head is skipped)
        assert seen["llama nodes"] == {"ops": 8, "from_local": 4, "redistribute": 4}
        assert seen["llama unmerged nodes"] == {"ops": 14, "from_local": 14, "redistribute": 14}
        torch.testing.assert_close(seen["llama"], seen["llama unmerged"], rtol=0, atol=0)


def test_layers_read_as_dtensors_or_behind_a_collective_stay_unmerged(ranks):
    """b (use_local_output=False, gathered whole) and d (its input gathered from row shards) keep their
    own ops with the reason; a and c still merge. Each column of a, b, c is the single process's (all
    four merged there) to the bit."""
    for rank, seen in enumerate(ranks):
        plan = seen["heads plan"]
        assert "one GEMM with c" in plan and "one GEMM with a" in plan
        assert "not merged with a, c, d: its output is read as a DTensor" in plan
        assert "not merged with b, a, c: its input is redistributed from (Shard(dim=0),) to (Replicate(),)" in plan  # in graph order
        a, b, c = seen["heads single"].chunk(3, -1)
        expected = torch.cat([a.chunk(RANKS, -1)[rank], b, c.chunk(RANKS, -1)[rank]], -1)
        torch.testing.assert_close(seen["heads"], expected, rtol=0, atol=0)
