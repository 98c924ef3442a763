"""A compiled graph Inductor serves from its on-disk cache (gpu marker): a second process skips the
lowering, which is where fbgemm-gpu-genai gets loaded, yet its FBGEMM GEMM calls must run."""

import os
import subprocess
import sys

import pytest

from fxquant.ops.availability import fbgemm_genai_available

pytestmark = pytest.mark.gpu

CHILD = """
import torch
from torch._dynamo.utils import counters

torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.SiLU(), torch.nn.Linear(512, 256))
mlp = mlp.to("cuda", torch.bfloat16)
x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    out, ref = torch.compile(mlp, backend="fxquant")(x), mlp(x)
hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
print(hits, float((out - ref).norm() / ref.norm()))
"""


def test_graph_from_inductors_cache_calls_fbgemm(tmp_path):
    if not fbgemm_genai_available():
        pytest.skip("fbgemm-gpu-genai does not load: the heuristic does not pick FBGEMM")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    (cold_hits, cold_error), (warm_hits, warm_error) = (map(float, run.stdout.split()[-2:]) for run in runs)
    assert cold_hits == 0 and warm_hits >= 1, "the second process takes the graph from the cache"
    assert warm_error == cold_error and warm_error < 0.05, "FP8 rowwise against the bf16 layers"
