"""fxquant's Inductor integration (fxquant/inductor/install.py): one idempotent install puts its
decompositions into Inductor's own table, where every compile finds them (the backend's, AOTInductor's,
plain Inductor's), and each declines an activation that is not on CUDA."""

import pytest
import torch
from torch._inductor import decomposition as inductor_decomposition
from torch._inductor import lowering
from torch._inductor.decomposition import select_decomp_table

from fxquant.inductor import install
from fxquant.inductor.install import scheme_decompositions
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

OPS = list(scheme_decompositions())


def test_import_installed_and_a_second_install_changes_nothing():
    table = select_decomp_table()
    before = {op: inductor_decomposition.decompositions[op] for op in OPS}
    fallbacks = {op: lowering.lowerings[op] for op in OPS}
    install.install()
    assert select_decomp_table() is table, "the cached table was rebuilt"
    assert {op: inductor_decomposition.decompositions[op] for op in OPS} == before
    assert {op: lowering.lowerings[op] for op in OPS} == fallbacks
    assert all(table[op] is before[op] for op in OPS)


def test_the_table_holds_them_even_when_inductor_cached_it_before(monkeypatch):
    for op in OPS:  # as before the first install; restored afterwards
        monkeypatch.delitem(inductor_decomposition.decompositions, op)
        monkeypatch.setitem(lowering.lowerings, op, lowering.lowerings[op])
    try:
        inductor_decomposition.fast_random_decomps.cache_clear()
        assert not set(OPS) & select_decomp_table().keys()  # cached without fxquant's
        install.install()
        assert set(OPS) <= select_decomp_table().keys()
    finally:
        inductor_decomposition.fast_random_decomps.cache_clear()


def fp8_rowwise_arguments():
    torch.manual_seed(0)
    w_q, w_scale = quantize_fp8_rowwise(torch.randn(32, 64))
    return torch.randn(4, 64, dtype=torch.bfloat16), w_q, w_scale, None, None


CPU_LOWERED = {torch.ops.fxquant.int8_linear.default}  # decompositions naming the CPU (lowered_device_types)


@pytest.mark.parametrize("op", [op for op in OPS if op not in CPU_LOWERED], ids=str)
def test_a_decomposition_declines_a_cpu_activation(op):
    """NotImplemented: AOTAutograd keeps the op whole, and on the CPU it runs its reference."""
    assert select_decomp_table()[op](*fp8_rowwise_arguments()) is NotImplemented


def test_int8s_decomposition_applies_on_the_cpu_too():
    """int8 names the CPU among its devices: Inductor's int8 GEMM is its fast path there."""
    from fxquant.ops.int8 import quantize_int8_rowwise

    torch.manual_seed(0)
    w_q, w_scale = quantize_int8_rowwise(torch.randn(32, 64))
    arguments = (torch.randn(4, 64), w_q, w_scale, torch.randn(32))
    decomposition = select_decomp_table()[torch.ops.fxquant.int8_linear.default]
    assert decomposition(*arguments) is not NotImplemented
    torch.testing.assert_close(decomposition(*arguments), torch.ops.fxquant.int8_linear(*arguments), rtol=0, atol=0)


def test_a_decomposition_applies_where_fxquant_lowers(monkeypatch):
    monkeypatch.setattr(install, "LOWERED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    decomposition = select_decomp_table()[torch.ops.fxquant.fp8_rowwise_linear.default]
    arguments = fp8_rowwise_arguments()
    torch.testing.assert_close(decomposition(*arguments), torch.ops.fxquant.fp8_rowwise_linear(*arguments))
