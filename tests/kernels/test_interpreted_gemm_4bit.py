"""The 4-bit kernels on the CPU under Triton's interpreter, in a subprocess (the variable is read
when a kernel is defined; tests/kernels/interpreted_4bit_cases.py). The dequantize kernel
(fxquant/kernels/dequantize_4bit.py) equals the reference weight to the bit. The fused
dequantize-GEMV and dequantize-MMA kernels (fxquant/kernels/gemm_4bit.py) against the float64 product
of x and the weight dequantized from the bytes with bitsandbytes' tables. float32 compute: the same
products, only the summation order differs (1e-5 of the largest output); float16: the reference's
weight rounded to fp16 (the GEMV never forms it, the MMA kernel rounds it as the reference) and the
output rounded, within 2^-10 of the largest output (3e-4 to 5e-4 measured). Not bfloat16: the interpreter truncates
to bfloat16 where the GPU rounds, so bf16 runs in the GPU test (tests/kernels/test_cuda_bnb.py)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton package is not installed")
REPOSITORY = pathlib.Path(__file__).parents[2]


def interpret(kernel: str, cases: list[dict]) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.interpreted_4bit_cases", kernel, json.dumps(cases)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPOSITORY, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def check_fused_product(cases: list[dict], splits: list[int]) -> None:
    results = interpret("gemm", cases)
    assert [r["splits"] for r in results] == splits
    for case, result in zip(cases, results):
        assert result["shape"] == [case["m"], case["n"]] and result["dtype"] == f"torch.{case['dtype']}", case
        bound = 1e-5 if case["dtype"] == "float32" else 2.0**-10
        assert result["worst"] < bound, f"{case}: {result['worst']:.2e} of the largest output"
        # each slice's sum is the op's CPU reference's (fxquant::linear_4bit_partials): up to float32
        # summation order, and in fp16 the MMA kernel's weight rounded to fp16 (2^-11 per element)
        assert result["partials_shape"] and result["partials_worst"] < bound, case


def test_fused_4bit_gemv_matches_the_float64_reference():
    # one row; N not a multiple of BLOCK_N; K cut into 1 to 16 even slices (1408: 44 steps of 32, so 4
    # slices where 5 were wanted); block sizes 32 to 4096, one absmax block a step or several steps a
    # block (256, 4096: steps of 128); NF4 and FP4
    check_fused_product([
        dict(m=1, n=128, k=1024, quant_type="nf4", blocksize=64, dtype="float32"),
        dict(m=1, n=96, k=512, quant_type="fp4", blocksize=128, dtype="float32"),
        dict(m=1, n=64, k=1408, quant_type="nf4", blocksize=32, dtype="float32"),
        dict(m=1, n=200, k=256, quant_type="nf4", blocksize=64, dtype="float16"),
        dict(m=1, n=64, k=1024, quant_type="fp4", blocksize=256, dtype="float16"),
        dict(m=1, n=8, k=4096, quant_type="nf4", blocksize=4096, dtype="float32"),
    ], splits=[4, 2, 4, 1, 4, 16])


def test_fused_4bit_mma_matches_the_float64_reference():
    # 2 to 16 rows (padded to the MMA's 16); N not a multiple of the kernel's 64; steps of 128 holding
    # 4 absmax blocks (32), 2 (64), one (128), or inside one block (256, 4096); K not a multiple of 128
    # (1088: steps of one 64-block, 17 of them, so one slice); NF4 and FP4
    check_fused_product([
        dict(m=16, n=128, k=1024, quant_type="nf4", blocksize=64, dtype="float32"),
        dict(m=7, n=200, k=1088, quant_type="fp4", blocksize=64, dtype="float16"),
        dict(m=2, n=64, k=512, quant_type="nf4", blocksize=32, dtype="float32"),
        dict(m=16, n=96, k=1024, quant_type="nf4", blocksize=256, dtype="float16"),
        dict(m=3, n=64, k=4096, quant_type="fp4", blocksize=4096, dtype="float32"),
        dict(m=5, n=64, k=512, quant_type="nf4", blocksize=128, dtype="float16"),
    ], splits=[4, 1, 2, 4, 16, 2])


def test_dequantize_kernel_is_the_reference_to_the_bit():
    # float32 and float16 (numpy rounds to nearest, as the GPU does; the interpreter truncates to
    # bfloat16, so bf16 runs in the GPU test); a K tail; block sizes 64, 32 and 512 (one per tile)
    cases = [dict(n=40, k=1024, quant_type="nf4", blocksize=64, dtype="float32"),
             dict(n=64, k=320, quant_type="fp4", blocksize=32, dtype="float16"),
             dict(n=33, k=1024, quant_type="nf4", blocksize=512, dtype="float32")]
    for case, result in zip(cases, interpret("dequantize", cases)):
        assert result["shape"] == [case["n"], case["k"]] and result["dtype"] == f"torch.{case['dtype']}", case
        assert result["equal"], case
