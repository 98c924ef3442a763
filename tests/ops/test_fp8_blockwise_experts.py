"""fp8_blockwise on expert weights (fxquant/ops/fp8_blockwise_experts.py): the per-expert block
quantizer and the batched / grouped ops against a float64 reference of the formula written again
from tests/ops/formula_reference.py (nothing of fxquant's quantizer), shape errors, opcheck."""

import pytest
import torch

from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight
from tests.ops.formula_reference import quantize_fp8

batched = torch.ops.fxquant.fp8_blockwise_batched_mm
grouped = torch.ops.fxquant.fp8_blockwise_grouped_mm
OPCHECK_TESTS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

BLOCK = (32, 64)
E, N, K = 4, 96, 128


def reference_weight(w: torch.Tensor, block=BLOCK):
    """(e4m3 bytes, float64 dequantized [E, N, K], float64 scale [E, N / bn, K / bk]) per expert and block."""
    e, n, k = w.shape
    blocks = w.double().reshape(e, n // block[0], block[0], k // block[1], block[1])
    codes, values, scale = quantize_fp8(blocks, dims=(2, 4))
    return codes.reshape(e, n, k), (values * scale).reshape(e, n, k), scale[:, :, 0, :, 0]


def reference_rows(x: torch.Tensor, w: torch.Tensor, experts: list[int], block=BLOCK, scale_ub=None) -> torch.Tensor:
    """float64 y[s] = x_q[s] (per token, per bk group) · dequantized w[experts[s]] (experts[s] < 0: a zero row)."""
    s, k = x.shape
    _, x_values, x_scale = quantize_fp8(x.double().reshape(s, k // block[1], block[1]), dims=(2,), scale_ub=scale_ub)
    x_deq = (x_values * x_scale).reshape(s, k)
    _, w_deq, _ = reference_weight(w, block)
    rows = [w_deq[e] @ x_deq[i] if e >= 0 else torch.zeros(w.shape[1], dtype=torch.float64) for i, e in enumerate(experts)]
    return torch.stack(rows)


def test_expert_weights_are_quantized_per_expert_and_block():
    torch.manual_seed(0)
    w = torch.randn(E, N, K)
    w[2] *= 1000  # one expert far larger: its scales are its own
    w_q, w_scale = quantize_fp8_blockwise_weight(w, BLOCK)
    codes, _, scale = reference_weight(w)
    assert w_q.shape == (E, N, K) and w_scale.shape == (E, N // 32, K // 64)
    assert torch.equal(w_q.view(torch.uint8), codes), "e4m3 bytes differ from the formula's"
    assert torch.equal(w_scale.double(), scale)
    for e in range(E):  # each expert exactly as the dense quantizer does it
        dense_q, dense_scale = quantize_fp8_blockwise_weight(w[e], BLOCK)
        assert torch.equal(dense_q.view(torch.uint8), w_q[e].view(torch.uint8)) and torch.equal(dense_scale, w_scale[e])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("scale_ub", [None, 2.0])
def test_batched_matches_float64_reference(dtype, tolerance, scale_ub):
    torch.manual_seed(1)
    x, w = torch.randn(70, K, dtype=dtype), torch.randn(E, N, K)  # 70 rows: more than one gather of 64
    ids = torch.randint(0, E, (70,))
    w_q, w_scale = quantize_fp8_blockwise_weight(w, BLOCK)
    y = batched(x, w_q, w_scale, ids, scale_ub)
    assert y.dtype == dtype and y.shape == (70, N)
    expected = reference_rows(x, w, ids.tolist(), scale_ub=scale_ub)
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)


def test_grouped_matches_float64_reference_with_empty_groups_and_rows_past_the_last():
    torch.manual_seed(2)
    x, w = torch.randn(12, K), torch.randn(E, N, K)
    offsets = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # expert 1 has no rows; rows 10, 11 none
    w_q, w_scale = quantize_fp8_blockwise_weight(w, BLOCK)
    y = grouped(x, w_q, w_scale, offsets, None)
    experts = [0] * 3 + [2] * 4 + [3] * 3 + [-1] * 2
    torch.testing.assert_close(y.double(), reference_rows(x, w, experts), rtol=1e-5, atol=1e-5)
    assert torch.all(y[10:] == 0)


def test_grouped_rows_of_tokens_match_the_float64_reference():
    """rows: the op's rows are x[rows] (each token once per expert it is routed to), against the
    reference on the gathered rows, with the check that rows are indices."""
    torch.manual_seed(4)
    tokens, w = torch.randn(5, K), torch.randn(E, N, K)
    rows = torch.tensor([4, 0, 0, 2, 1, 3, 4, 2])
    offsets = torch.tensor([2, 4, 4, 7], dtype=torch.int32)  # expert 2 has no rows; row 7 none
    w_q, w_scale = quantize_fp8_blockwise_weight(w, BLOCK)
    y = grouped(tokens, w_q, w_scale, offsets, None, rows)
    experts = [0] * 2 + [1] * 2 + [3] * 3 + [-1]
    torch.testing.assert_close(y.double(), reference_rows(tokens[rows], w, experts), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(grouped, (tokens, w_q, w_scale, offsets, None, rows), test_utils=OPCHECK_TESTS)
    with pytest.raises(RuntimeError, match=r"rows must be a 1-D integer tensor \(indices of x's rows\)"):
        grouped(tokens, w_q, w_scale, offsets, None, rows > 2)


def test_one_expert_row_equals_the_dense_op():
    """A batched row is the dense fp8_blockwise_linear of that row and that expert, bit for bit."""
    torch.manual_seed(3)
    x, w = torch.randn(5, K), torch.randn(E, N, K)
    w_q, w_scale = quantize_fp8_blockwise_weight(w, BLOCK)
    ids = torch.tensor([3, 0, 3, 1, 2])
    y = batched(x, w_q, w_scale, ids, None)
    for s, e in enumerate(ids.tolist()):
        dense = torch.ops.fxquant.fp8_blockwise_linear(x[s : s + 1], w_q[e], w_scale[e], None, None)
        torch.testing.assert_close(y[s : s + 1], dense, rtol=2e-6, atol=1e-6)


def test_shape_errors_name_the_op_and_the_shapes():
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(E, N, K), BLOCK)
    ids = torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"fp8_blockwise_batched_mm: activation has K=64 but the weight is \[E, N, K=128\]"):
        batched(torch.randn(2, 64), w_q, w_scale, ids, None)
    with pytest.raises(RuntimeError, match=r"weight scale must be float32 \[E=4, N / block_n, K / block_k\], got torch.float32 \[3, 3, 2\]"):
        batched(torch.randn(2, K), w_q, w_scale[:3], ids, None)
    with pytest.raises(RuntimeError, match=r"is not a whole number of \[5, 2\] blocks per expert"):
        grouped(torch.randn(2, K), w_q, torch.ones(E, 5, 2), torch.tensor([1, 2, 2, 2], dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="offsets must be a 1-D integer tensor"):
        grouped(torch.randn(2, K), w_q, w_scale, torch.ones(E), None)


def test_opcheck():
    w_q, w_scale = quantize_fp8_blockwise_weight(torch.randn(E, N, K), BLOCK)
    offsets = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    torch.library.opcheck(batched, (torch.randn(6, K), w_q, w_scale, torch.randint(0, E, (6,)), None), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(grouped, (torch.randn(6, K, dtype=torch.bfloat16), w_q, w_scale, offsets, 10.0), test_utils=OPCHECK_TESTS)
    x = torch.randn(6, K, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        grouped(x, w_q, w_scale, offsets, None).sum().backward()
