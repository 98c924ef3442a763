"""fxquant's own Triton kernels on the CPU, under Triton's interpreter (TRITON_INTERPRET=1).

The cases run in a subprocess (tests/kernels/interpreted_cases.py), because the variable is read
when a kernel is defined. The interpreter casts fp32 to bf16 by truncation and the GPU rounds to
nearest: either way each output is within one bf16 ulp (2^-7 relative) of the exact float64
result. Needs the triton package (the `test` extra installs it on Linux); without it these skip.
The GPU tests run the same kernels through the ops and the lowering.
"""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton package is not installed")
REPOSITORY = pathlib.Path(__file__).parents[2]


def _interpreter_loops_to_runtime_bounds() -> bool:
    """Triton 3.6's interpreter turns a runtime loop bound into int() of a 1-element numpy array,
    which numpy 2.4 refuses (seen on the device: triton 3.6.0); 3.9's squeezes it first."""
    major, minor = (int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    return (major, minor) >= (3, 9)


def interpret(kernel: str, cases: list[dict]) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.interpreted_cases", kernel, json.dumps(cases)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPOSITORY, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_split_k_gemm_is_exact_to_a_bf16_ulp():
    # tails in N and K; K cut into 4, 1, 2, 1 and 8 slices for 132 SMs; no tokens; no input channels
    cases = [(1, 512, 4096, 4), (7, 208, 272, 1), (16, 96, 2304, 2), (3, 64, 1000, 1), (2, 64, 8192, 8), (0, 64, 256, 1),
             (2, 64, 0, 1)]
    results = interpret("split_k", [dict(m=m, n=n, k=k) for m, n, k, _ in cases])
    for (m, n, k, splits), result in zip(cases, results):
        assert result["shape"] == [m, n] and result["dtype"] == "torch.bfloat16", (m, n, k)
        assert result["splits"] == splits, (m, n, k)
        assert result["within"], f"M={m} N={n} K={k}: {result['worst']:.2e} beyond one bf16 ulp"


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])  # float16: a layer without bias (bf16 is truncated here)
def test_int8_split_k_gemm_gives_the_references_bits(out_dtype):
    # as the FP8 kernel's cases: tails in N and K, K cut into 4, 1, 2, 1 and 8 slices, no tokens, no channels
    cases = [(1, 512, 4096, 4), (7, 208, 272, 1), (16, 96, 2304, 2), (3, 64, 1000, 1), (2, 64, 8192, 8), (0, 64, 256, 1),
             (2, 64, 0, 1)]
    results = interpret("int8_split_k", [dict(m=m, n=n, k=k, out_dtype=out_dtype) for m, n, k, _ in cases])
    for (m, n, k, splits), result in zip(cases, results):
        assert result["shape"] == [m, n] and result["dtype"] == f"torch.{out_dtype}", (m, n, k)
        assert result["splits"] == splits, (m, n, k)
        assert result["reference_bits"], f"M={m} N={n} K={k}: not fxquant's reference bit for bit"
        assert result["within"], f"M={m} N={n} K={k}: {result['worst']:.2e} from the float64 formula"


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_int8_tiled_gemm_gives_the_references_bits(out_dtype):
    # the run-time pick above 16 rows: the template's tile for each M bucket (64 x 64, 128 x 128,
    # 128 x 256), tails in M, N and K (K = 256: whole steps, unmasked loads), no channels
    cases = [(40, 96, 272, [64, 64, 128]), (300, 208, 1000, [128, 128, 128]), (1100, 64, 256, [128, 256, 128]),
             (20, 64, 0, [64, 64, 128])]
    results = interpret("int8_tiled", [dict(m=m, n=n, k=k, out_dtype=out_dtype) for m, n, k, _ in cases])
    for (m, n, k, tile), result in zip(cases, results):
        assert result["shape"] == [m, n] and result["dtype"] == f"torch.{out_dtype}", (m, n, k)
        assert result["tile"] == tile, (m, n, k)
        assert result["reference_bits"], f"M={m} N={n} K={k}: not fxquant's reference bit for bit"
        assert result["within"], f"M={m} N={n} K={k}: {result['worst']:.2e} from the float64 formula"


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is not None and not _interpreter_loops_to_runtime_bounds(),
    reason="this triton's interpreter cannot run a loop to a runtime bound (the kernel's K loop); triton >= 3.9 can",
)
def test_blockwise_gemm_is_exact_to_a_bf16_ulp():
    # decode and prefill tiles, N not a multiple of BLOCK_N, 128 x 128 and 64 x 32 blocks, no tokens
    cases = [dict(m=1, n=256, k=512, block_n=128, block_k=128), dict(m=20, n=192, k=256, block_n=64, block_k=32),
             dict(m=130, n=128, k=256, block_n=128, block_k=128), dict(m=0, n=128, k=128, block_n=128, block_k=128)]
    for case, result in zip(cases, interpret("blockwise", cases)):
        assert result["shape"] == [case["m"], case["n"]] and result["dtype"] == "torch.bfloat16", case
        assert result["within"], f"{case}: {result['worst']:.2e} beyond one bf16 ulp"


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is not None and not _interpreter_loops_to_runtime_bounds(),
    reason="this triton's interpreter cannot run a loop to a runtime bound (the kernel's K loop); triton >= 3.9 can",
)
def test_grouped_gemm_is_exact_to_a_bf16_ulp():
    # decode (16-row tiles, experts with no rows, a group of one row), groups longer than a tile (64-row
    # tiles), K and N tails, rows past the last group (left unwritten, not compared), no rows at all;
    # two of benchmarks/moe.py's candidate tiles (32 wide with 256-long K steps over a K tail; 32-row
    # tiles over groups of 1 to 41 rows)
    narrow = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3)
    short = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    cases = [dict(s=5, n=64, k=128, counts=[0, 2, 0, 1, 2]), dict(s=40, n=96, k=160, counts=[17, 0, 23]),
             dict(s=150, n=128, k=256, counts=[70, 60]), dict(s=12, n=64, k=128, counts=[3, 0, 5, 0]),
             dict(s=0, n=64, k=128, counts=[0, 0]), dict(s=9, n=80, k=384, counts=[1, 0, 4, 3], config=narrow),
             dict(s=60, n=96, k=128, counts=[1, 41, 0, 17], config=short),
             # the grid's bound on row tiles (S // 16 + min(E, S)) reached: one row an expert, and two groups
             # of a tile and a row; fewer rows than experts
             dict(s=8, n=64, k=128, counts=[1] * 8), dict(s=34, n=64, k=128, counts=[17, 0, 17]),
             dict(s=3, n=64, k=128, counts=[1, 0, 0, 1, 0, 0, 1, 0]),
             # K split over programs (candidate tiles): 2 slices of 256 and 128, a tail slice of 32 (K = 160 cut
             # in 4 leaves 2 slices), 4 even slices; rows past the last group
             dict(s=9, n=80, k=384, counts=[1, 0, 4, 3], config={**narrow, "BLOCK_K": 128, "SPLIT_K": 2}),
             dict(s=40, n=96, k=160, counts=[17, 0, 23], config={**narrow, "BLOCK_K": 128, "SPLIT_K": 4}),
             dict(s=12, n=64, k=512, counts=[3, 0, 5, 1], config={**narrow, "BLOCK_K": 128, "SPLIT_K": 4})]
    for case, result in zip(cases, interpret("grouped", cases)):
        assert result["full_shape"] == [case["s"], case["n"]] and result["dtype"] == "torch.bfloat16", case
        assert result["shape"] == [sum(case["counts"]), case["n"]], case
        assert result["within"], f"{case}: {result['worst']:.2e} beyond one bf16 ulp"


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is not None and not _interpreter_loops_to_runtime_bounds(),
    reason="this triton's interpreter cannot run a loop to a runtime bound (the kernel's K loop); triton >= 3.9 can",
)
def test_blockwise_grouped_gemm_is_exact_to_a_bf16_ulp():
    # 128 x 128 blocks at decode (an expert with no rows) and with groups longer than a tile; 64 x 32
    # blocks with N not a multiple of BLOCK_N; rows past the last group (not compared)
    cases = [dict(s=6, n=256, k=256, block_n=128, block_k=128, counts=[2, 0, 3, 1]),
             dict(s=90, n=128, k=256, block_n=128, block_k=128, counts=[70, 20]),
             dict(s=30, n=192, k=128, block_n=64, block_k=32, counts=[9, 0, 19]),
             dict(s=2, n=128, k=128, block_n=128, block_k=128, counts=[0, 1, 0, 0, 1, 0])]  # the bound on row tiles reached
    for case, result in zip(cases, interpret("blockwise_grouped", cases)):
        assert result["full_shape"] == [case["s"], case["n"]] and result["dtype"] == "torch.bfloat16", case
        assert result["shape"] == [sum(case["counts"]), case["n"]], case
        assert result["within"], f"{case}: {result['worst']:.2e} beyond one bf16 ulp"
