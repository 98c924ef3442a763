"""fp8_rowwise's expert ops opened up for Inductor (fxquant/inductor/decompositions.py) and their grouped
GEMM op (fxquant/ops/fp8_rowwise_grouped_gemm.py), on the CPU: the GEMM op's reference against float64,
the batched and grouped forms rebuilt on it against the reference expert ops, and the activation
quantization fused into the SiLU·mul that produces it (Inductor's C++ backend, the GEMM op run as its
reference). The CUDA kernels are tests/kernels/test_cuda_experts.py's."""

import re

import pytest
import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.utils import run_and_get_code

from fxquant.inductor import decompositions
from fxquant.inductor.install import scheme_decompositions
from fxquant.inductor.settings import fxquant_inductor_settings
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from tests.models import relative_error

gemm = torch.ops.fxquant.fp8_rowwise_grouped_gemm
OPCHECK_TESTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")  # no fp8 math on CPU
COUNTS = [3, 0, 5, 1, 6]  # an expert with no rows; 15 rows of 17 in groups, 2 past the last


def operands(rows=17, n=48, k=64, counts=COUNTS):
    torch.manual_seed(0)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(len(counts), n, k) / k**0.5)
    return x, w_q, w_scale, torch.tensor(counts).cumsum(0).to(torch.int32)


def test_grouped_gemm_reference_is_exact_to_a_bf16_ulp_and_zeroes_rows_past_the_groups():
    x, w_q, w_scale, offsets = operands()
    x_q, x_scale = quantize_fp8_rowwise(x)
    out = gemm(x_q, w_q, x_scale, w_scale, offsets)
    expert = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS))  # the expert of each grouped row
    grouped = len(expert)
    exact = torch.einsum("sk,snk->sn", x_q[:grouped].double(), w_q[expert].double())
    exact = exact * x_scale[:grouped, None].double() * w_scale[expert].double()
    assert out.dtype == torch.bfloat16 and out.shape == (17, 48)
    assert ((out[:grouped].double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    assert (out[grouped:] == 0).all()


def test_grouped_gemm_opcheck():
    x, w_q, w_scale, offsets = operands()
    x_q, x_scale = quantize_fp8_rowwise(x)
    torch.library.opcheck(gemm, (x_q, w_q, x_scale, w_scale, offsets), test_utils=OPCHECK_TESTS)
    for kernel in ("scaled_grouped_mm_rowwise", "fbgemm_grouped_rowwise", "triton_grouped_rowwise"):
        fake = getattr(torch.ops.fxquant, kernel)  # their fake implementations (the kernels are CUDA-only)
        with torch._subclasses.FakeTensorMode() as mode:
            args = [mode.from_tensor(t) for t in (x_q, w_q, x_scale, w_scale, offsets)]
            assert fake(*args).shape == (17, 48) and fake(*args).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["grouped", "batched"])
def test_decompositions_equal_the_reference_ops(kind):
    """What the CUDA kernels and Inductor run, with the GEMM op's reference: the same numbers as the
    reference expert op, the batched rows ordered by expert and back (sums in another order: within a
    bf16 rounding)."""
    x, w_q, w_scale, offsets = operands()
    if kind == "grouped":
        op, decomposition, rows = torch.ops.fxquant.fp8_rowwise_grouped_mm, decompositions.fp8_rowwise_grouped_mm, offsets
    else:
        rows = torch.randint(0, len(COUNTS), (17,), generator=torch.Generator().manual_seed(1))
        op, decomposition = torch.ops.fxquant.fp8_rowwise_batched_mm, decompositions.fp8_rowwise_batched_mm
    for scale_ub in (None, 1.5):
        expected = op(x, w_q, w_scale, rows, scale_ub)
        torch.testing.assert_close(decomposition(x, w_q, w_scale, rows, scale_ub), expected, rtol=2**-8, atol=1e-6)


def test_grouped_rows_are_the_gathered_rows_quantized_first():
    """rows: the grouped op on x[rows] (each token once per expert it is routed to), in the reference op,
    its decomposition and its opcheck; a token's codes are the same wherever it is gathered to."""
    x, w_q, w_scale, offsets = operands(rows=7)
    rows = torch.randint(0, 7, (17,), generator=torch.Generator().manual_seed(2))
    op = torch.ops.fxquant.fp8_rowwise_grouped_mm
    expected = op(x[rows], w_q, w_scale, offsets, None)
    assert torch.equal(op(x, w_q, w_scale, offsets, None, rows), expected)
    torch.testing.assert_close(decompositions.fp8_rowwise_grouped_mm(x, w_q, w_scale, offsets, None, rows), expected,
                               rtol=2**-8, atol=1e-6)
    torch.library.opcheck(op, (x, w_q, w_scale, offsets, None, rows), test_utils=OPCHECK_TESTS)


def test_decompositions_decline_off_cuda():
    """Installed in Inductor's table, the expert ops stay whole on the CPU (their reference runs)."""
    table = select_decomp_table()
    x, w_q, w_scale, offsets = operands()
    for op in (torch.ops.fxquant.fp8_rowwise_grouped_mm.default, torch.ops.fxquant.fp8_rowwise_batched_mm.default):
        assert table[op](x, w_q, w_scale, offsets) is NotImplemented


def compile_with_lowering(fn):
    table = {**select_decomp_table(), **scheme_decompositions()}  # the decompositions, not declining on the CPU
    patches = fxquant_inductor_settings({})
    return torch.compile(fn, backend=lambda gm, inputs: compile_fx(gm, inputs, decompositions=table, config_patches=patches))


def generated_kernels(code: str) -> list[str]:
    return ["'''".join(chunk.split("'''", 2)[:2]) for chunk in code.split("async_compile.cpp_pybinding(")[1:]]


@pytest.mark.skipif(torch.__version__ < "2.13", reason="torch 2.11's C++ backend does not emulate the bf16 rounding")
@pytest.mark.parametrize("kind", ["grouped", "batched"])
def test_expert_quantization_fuses_into_silu_mul(kind):
    """SiLU·mul (an expert's gate and up halves) then the down projection: the activation's amax and
    cast are in the SiLU·mul kernel, the GEMM is the grouped GEMM op, and the result is the reference op's."""
    x, w_q, w_scale, offsets = operands(k=64)
    gate_up = torch.randn(17, 128, dtype=torch.bfloat16)
    ids = torch.randint(0, len(COUNTS), (17,), generator=torch.Generator().manual_seed(1))

    def down(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        if kind == "grouped":
            return torch.ops.fxquant.fp8_rowwise_grouped_mm(h, w_q, w_scale, offsets, None)
        return torch.ops.fxquant.fp8_rowwise_batched_mm(h, w_q, w_scale, ids, None)

    out, (code, *_) = run_and_get_code(compile_with_lowering(down), gate_up)
    assert "torch.ops.fxquant.fp8_rowwise_grouped_gemm.default(" in code
    assert f"fp8_rowwise_{kind}_mm.default(" not in code
    generated = generated_kernels(code)
    if kind == "grouped":
        fused = [k for k in generated if "float8" in k.lower()]
        assert len(fused) == 1 and "exp" in fused[0], f"the quantization is not in the SiLU·mul kernel:\n{code}"
    else:  # SiLU·mul with the rows' amax and the experts' counts; the gather by expert with the cast; the gather back
        assert len(generated) == 3 and "float8" in generated[1].lower(), code
    assert relative_error(out, down(gate_up)) < 1e-3


@pytest.mark.skipif(torch.__version__ < "2.13", reason="torch 2.11's C++ backend does not emulate the bf16 rounding")
def test_tokens_amax_is_reduced_once_per_token_and_the_gathered_rows_are_codes():
    """RMSNorm then gate_up on 17 rows gathered from 7 tokens (`rows`): the amax is reduced per token (a
    [7] buffer, beside RMSNorm's), the gathered rows are written as e4m3 codes only (no bf16 copy of
    them), and the result is the reference op's on the rows."""
    x, w_q, w_scale, offsets = operands(rows=7)
    rows = torch.randint(0, 7, (17,), generator=torch.Generator().manual_seed(2))
    weight = torch.rand(64, dtype=torch.bfloat16) + 0.5

    def gate_up(hidden):
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        normed = (hidden.float() * torch.rsqrt(variance + 1e-6)).to(hidden.dtype) * weight
        return torch.ops.fxquant.fp8_rowwise_grouped_mm(normed, w_q, w_scale, offsets, None, rows)

    out, (code, *_) = run_and_get_code(compile_with_lowering(gate_up), x)
    buffers = re.findall(r"empty_strided_cpu\(\((\d+), (?:(\d+))?\),.*?(torch\.\w+)\)", code)
    assert ("7", "", "torch.float32") in buffers, f"the amax is not reduced per token:\n{code}"
    assert ("17", "64", "torch.float8_e4m3fn") in buffers and ("17", "64", "torch.bfloat16") not in buffers, code
    assert relative_error(out, gate_up(x)) < 1e-3


def test_kernel_choice_by_shape_and_forced(monkeypatch, caplog):
    """The library kernels need N and K multiples of 16; FXQUANT_GROUPED_GEMM forces a kernel where it
    can run (else the heuristic's, with a warning) and names an unknown one."""
    from fxquant.inductor.fp8_rowwise_grouped_mm import even_offsets, wanted_kernels
    from fxquant.ops import fp8_rowwise_grouped_gemm

    monkeypatch.setattr(fp8_rowwise_grouped_gemm, "fbgemm_genai_available", lambda: False)
    monkeypatch.delenv("FXQUANT_GROUPED_GEMM", raising=False)
    library = ("scaled_grouped_mm",) if hasattr(torch, "_scaled_grouped_mm") else ()
    assert wanted_kernels(128, 256, autotune=True) == (*library, "triton")
    assert wanted_kernels(128, 256, autotune=False, rows=8 * 129, experts=8) == (*library, "triton")[:1]
    assert wanted_kernels(40, 256, autotune=True) == ("triton",)
    monkeypatch.setenv("FXQUANT_GROUPED_GEMM", "triton")
    assert wanted_kernels(128, 256, autotune=True) == ("triton",)
    monkeypatch.setenv("FXQUANT_GROUPED_GEMM", "fbgemm")
    assert wanted_kernels(128, 256, autotune=False, rows=8 * 129, experts=8) == (*library, "triton")[:1]
    assert "FXQUANT_GROUPED_GEMM=fbgemm cannot run" in caplog.text
    monkeypatch.setenv("FXQUANT_GROUPED_GEMM", "cutlass")
    with pytest.raises(ValueError, match="'cutlass'"):
        wanted_kernels(128, 256, autotune=False)
    assert even_offsets(100, 8, "cpu").tolist() == [12, 25, 37, 50, 62, 75, 87, 100]


def test_without_autotuning_the_kernel_follows_rows_per_expert(monkeypatch):
    """fxquant's Triton kernel up to 128 rows an expert on average, then FBGEMM's, then torch's (the
    order they ranked in on the H200); rows known only at run time: the op's own pick then (by_shape)."""
    from fxquant.inductor.fp8_rowwise_grouped_mm import wanted_kernels
    from fxquant.ops import fp8_rowwise_grouped_gemm
    from fxquant.ops.fp8_rowwise_grouped_gemm import kernel_for

    monkeypatch.delenv("FXQUANT_GROUPED_GEMM", raising=False)
    monkeypatch.setattr(fp8_rowwise_grouped_gemm, "fbgemm_genai_available", lambda: True)
    monkeypatch.setattr(torch.ops.fbgemm, "f8f8bf16_rowwise_grouped_stacked", object(), raising=False)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", object(), raising=False)
    # Qwen3-30B-A3B's gate_up (128 experts) at 1024 and 4096 tokens, top-8; Mixtral's at 256 and 1024, top-2
    assert [kernel_for(rows, experts, 1536, 2048) for rows, experts in ((8192, 128), (32768, 128))] == ["triton", "fbgemm"]
    assert [kernel_for(rows, 8, 28672, 4096) for rows in (512, 1024, 1025, 2048)] == ["triton", "triton", "fbgemm", "fbgemm"]
    assert kernel_for(4096, 8, 40, 256) == "triton"  # N not a multiple of 16: no library kernel
    monkeypatch.setattr(fp8_rowwise_grouped_gemm, "fbgemm_genai_available", lambda: False)
    assert kernel_for(2048, 8, 28672, 4096) == "scaled_grouped_mm"
    assert wanted_kernels(1536, 2048, autotune=False, rows=None, experts=128) == ("by_shape",)
    assert wanted_kernels(1536, 2048, autotune=False, rows=64, experts=128) == ("triton",)
