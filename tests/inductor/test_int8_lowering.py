"""int8's Inductor path (fxquant/inductor/int8_decompositions.py, int8_rowwise_mm.py): on the CPU the op
opens up into the quantization, aten._int_mm (float32 matmuls without VNNI / AMX) and the rescale,
compiled by Inductor; on CUDA its GEMM
is a choice per shape (the GPU runs are tests/kernels/test_cuda_int8.py)."""

import logging

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fxquant.inductor.int8_rowwise_mm import heuristic_choice
from fxquant.inductor.tuning import DEFAULT, H100
from fxquant.ops import int8 as int8_ops
from fxquant.ops.int8 import quantize_int8_rowwise


def layer_norm_then_int8(x, w_q, w_scale, bias):
    return torch.ops.fxquant.int8_linear(torch.nn.functional.layer_norm(x, x.shape[-1:]), w_q, w_scale, bias)


@pytest.mark.parametrize("dot_products", [True, False], ids=["vnni", "avx2"])
def test_on_the_cpu_inductor_compiles_the_quantization_and_the_int8_gemm(monkeypatch, dot_products):
    """With int8 dot products (VNNI, AMX) aten._int_mm, oneDNN's; without, float32 matmuls over slices
    of K (exact): either way the reference's numbers."""
    monkeypatch.setattr(int8_ops, "cpu_int8_slow_reason", lambda: None if dot_products else "no VNNI")
    torch.manual_seed(0)
    w_q, w_scale = quantize_int8_rowwise(torch.randn(48, 1100))
    x, bias = torch.randn(3, 5, 1100), torch.randn(48)
    compiled = torch.compile(layer_norm_then_int8, backend="inductor", fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):  # the other CPU's graph is the same graph
        y, (code,) = run_and_get_code(compiled, x, w_q, w_scale, bias)
    assert "torch.ops.fxquant.int8_linear" not in code, "the op was not opened up"
    assert ("extern_kernels._int_mm(" in code) == dot_products, code
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    # The codes are the reference's; Inductor's LayerNorm may differ from eager's by an ulp, which can
    # move a code by one: compare with the reference on the compiled LayerNorm's output.
    normed = torch.compile(lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:]), backend="inductor")(x)
    torch.testing.assert_close(y, torch.ops.fxquant.int8_linear(normed, w_q, w_scale, bias), rtol=1e-6, atol=1e-6)


def test_cuda_gemm_choice_by_rows():
    """split-K for one row (N <= splitk_max_n), the template to int8_cublas_min_rows, cuBLAS from there
    (Hopper: never, its cuBLAS int8 kernel is sm80's; other GPUs: above 128 rows); the run-time pick for
    a dynamic M."""
    cases = [(1, 4096, "splitk"), (1, 28672, "triton"), (16, 4096, "triton"), (128, 4096, "triton"),
             (129, 4096, "triton"), (8192, 6144, "triton"), (None, 4096, "by_rows")]
    assert [heuristic_choice(m, n, tuned=H100) for m, n, _ in cases] == [want for *_, want in cases]
    assert [heuristic_choice(m, 4096, tuned=DEFAULT) for m in (128, 129, 4096)] == ["triton", "cublas", "cublas"]


def test_a_forced_choice_wins_where_it_fits_and_says_so_elsewhere(monkeypatch, caplog):
    monkeypatch.setenv("FXQUANT_INT8_GEMM", "cublas")
    assert heuristic_choice(4096, 4096, tuned=H100) == "cublas"
    with caplog.at_level(logging.WARNING, logger="fxquant"):
        assert heuristic_choice(16, 4096, tuned=H100) == "triton"  # cuBLAS's _int_mm needs more than 16 rows
    monkeypatch.setenv("FXQUANT_INT8_GEMM", "splitk")
    assert heuristic_choice(16, 28672, tuned=H100) == "splitk"
    monkeypatch.setenv("FXQUANT_INT8_GEMM", "by_rows")
    assert heuristic_choice(None, 4096, tuned=H100) == "by_rows"
    monkeypatch.setenv("FXQUANT_INT8_GEMM", "fbgemm")
    with pytest.raises(ValueError, match="want one of"):
        heuristic_choice(1, 4096, tuned=H100)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemm, marker", [("cublas", "extern_kernels._int_mm("), ("by_rows", "fxquant_int8_rowwise_mm_by_rows")])
def test_the_lowerings_library_choices_compile_to_the_references_bits(monkeypatch, gemm, marker, out_dtype):
    """The cuBLAS choice (Inductor's _int_mm, the scales as pointwise code fused with what follows) and
    the run-time pick, lowered for CPU tensors (where _int_mm is oneDNN's), in float32 and in the
    activation's dtype (a layer without bias): the op's bits."""
    from fxquant.inductor import int8_rowwise_mm

    if gemm == "cublas" and out_dtype == torch.bfloat16 and torch.__version__ < "2.13":
        pytest.skip("torch 2.11's C++ backend adds the 1.0 to the unrounded product (emulate_precision_casts is "
                    "Triton-only there): one bf16 rounding fewer than eager")
    monkeypatch.setattr(int8_rowwise_mm, "LOWERED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    monkeypatch.setenv("FXQUANT_INT8_GEMM", gemm)
    torch.manual_seed(0)
    x_q, x_scale = quantize_int8_rowwise(torch.randn(40, 96))
    w_q, w_scale = quantize_int8_rowwise(torch.randn(48, 96))

    def gemm_then_bias(x_q, x_scale):
        return torch.ops.fxquant.int8_rowwise_mm(x_q, w_q, x_scale, w_scale, out_dtype) + 1.0

    compiled = torch.compile(gemm_then_bias, backend="inductor", fullgraph=True, dynamic=gemm == "by_rows")
    # the choice is an environment variable; the bf16 output rounded before the add, as eager does (fxquant's setting)
    with torch._inductor.config.patch(force_disable_caches=True, emulate_precision_casts=True):
        y, (code,) = run_and_get_code(compiled, x_q, x_scale)
    assert marker in code, code
    assert y.dtype == out_dtype and torch.equal(y, gemm_then_bias(x_q, x_scale))
    if gemm == "by_rows":
        assert f"out_dtype=torch.{str(out_dtype).removeprefix('torch.')}" in code or out_dtype == torch.float32, code


def test_serving_batch_sizes_have_their_own_template_bucket():
    """M from 129 to 512 (decode with hundreds of sequences, chunked prefill): its own autotune candidates."""
    assert H100.configs_for(129) == H100.configs_for(512) != H100.configs_for(513)
    assert H100.configs_for(129) != H100.configs_for(128)


def test_a_forced_int8_gemm_has_its_own_cache_tag(monkeypatch):
    from fxquant.inductor.cache_key import cache_key_tag

    monkeypatch.delenv("FXQUANT_INT8_GEMM", raising=False)
    heuristic = cache_key_tag()
    monkeypatch.setenv("FXQUANT_INT8_GEMM", "cublas")
    assert cache_key_tag() != heuristic


def test_the_cpu_int8_gemm_has_its_own_cache_tag(monkeypatch):
    """int8's CPU decomposition differs by the CPU's int8 dot products: code compiled on one CPU must
    not run on the other (AOTAutograd's cache holds the decomposed graph)."""
    from fxquant.inductor import cache_key

    monkeypatch.setattr(cache_key, "cpu_int8_slow_reason", lambda: None)
    with_dot_products = cache_key.cache_key_tag()
    monkeypatch.setattr(cache_key, "cpu_int8_slow_reason", lambda: "no VNNI")
    assert cache_key.cache_key_tag() != with_dot_products and ":cpu-int8-as-float:" in cache_key.cache_key_tag()
