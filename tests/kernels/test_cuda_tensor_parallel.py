"""Tensor parallelism on two GPUs over NCCL (gpu marker; skipped with fewer than two GPUs): a tiny
Llama sharded with parallelize_module, compiled with fxquant in both ranks, with and without CUDA
graphs, against the single-GPU fxquant model (the same tolerance as the CPU test's)."""

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu
RANKS = 2


def _worker(rank: int, directory: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import fxquant
    from tests.models import tiny_llama

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{directory}/store", rank=rank, world_size=RANKS)
    try:
        mesh = init_device_mesh("cuda", (RANKS,))
        model = tiny_llama().to("cuda", torch.bfloat16)
        tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1)).cuda()
        seen = {}
        with torch.no_grad():
            seen["single"] = torch.compile(copy.deepcopy(model), backend="fxquant")(tokens).logits.float().cpu()
            for layer in model.model.layers:
                parallelize_module(layer.self_attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                           "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
                parallelize_module(layer.mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                                     "down_proj": RowwiseParallel()})
            for mode in ("default", "reduce-overhead"):
                torch._dynamo.reset()
                backend = fxquant.backend()
                compiled = torch.compile(model, backend=backend, **({} if mode == "default" else {"mode": mode}))
                for _ in range(3):  # reduce-overhead: warm-up, record, replay
                    logits = compiled(tokens).logits
                seen[mode] = logits.float().cpu()
                seen[f"{mode} plan"] = str(backend.plans[-1])
        torch.save(seen, os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < RANKS, reason="needs two GPUs")
def test_a_tensor_parallel_llama_on_two_gpus_computes_what_one_gpu_does(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=RANKS)
    for rank in range(RANKS):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in ("default", "reduce-overhead"):
            assert (seen[mode] - seen["single"]).norm() / seen["single"].norm() < 0.05, mode
            assert "14 of 15 linear layers quantized" in seen[f"{mode} plan"]
            assert f"row-wise: K {rank * 64}-{rank * 64 + 63} on rank {rank} of 2" in seen[f"{mode} plan"]
