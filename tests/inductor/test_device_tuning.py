"""Tuning constants per GPU (fxquant/inductor/tuning.py): which row a device gets, and that the lowering
and the whole-row choice read it through Inductor's choices handler. CPU only: device names faked."""

import dataclasses
from types import SimpleNamespace

import pytest
import sympy
import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.virtualized import V

from fxquant.inductor import tuning as tuning_table
from fxquant.inductor.choices import WholeRowReductions, tuning
from fxquant.inductor.fp8_rowwise_mm import heuristic_choice
from fxquant.inductor.tuning import DEFAULT, H100, H200, device_tuning, tuning_for


@pytest.mark.parametrize(("name", "row"), [
    ("NVIDIA H100 80GB HBM3", H100), ("NVIDIA H100 PCIe", H100), ("NVIDIA H200", H200),
    ("NVIDIA GH200 480GB", DEFAULT), ("NVIDIA A100-SXM4-80GB", DEFAULT), ("", DEFAULT),
])
def test_a_gpu_gets_its_row_by_name(name, row):
    assert tuning_for(name) is row


def test_the_h200_row_is_the_h100s_until_measured():
    """benchmarks/RESULTS.md measured no constant apart on the H200: its row changes nothing yet. Other
    GPUs take the H100's numbers but cuBLAS's int8 GEMM above 128 rows (sm80's kernel is native there)."""
    assert dataclasses.replace(H200, name="H100") == H100
    assert dataclasses.replace(DEFAULT, name="H100", int8_cublas_min_rows=H100.int8_cublas_min_rows) == H100
    assert DEFAULT.int8_cublas_min_rows == 129


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA "available", device 0 named as the test sets `fake_gpu.name`."""
    gpu = SimpleNamespace(name="NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: gpu.name)
    tuning_table._cuda_tuning.cache_clear()
    yield gpu
    tuning_table._cuda_tuning.cache_clear()


def test_a_device_gets_the_row_of_its_gpu(fake_gpu):
    assert device_tuning(torch.device("cuda", 0)) is device_tuning() is H200
    assert device_tuning(torch.device("cpu")) is DEFAULT
    tuning_table._cuda_tuning.cache_clear()
    fake_gpu.name = "NVIDIA H100 80GB HBM3"
    assert device_tuning(torch.device("cuda")) is H100


FAST_FBGEMM = dataclasses.replace(H100, name="test", fbgemm_max_rows=1024, whole_row_limit=2048)


class TunedChoices(WholeRowReductions):
    """A user's choices class tuning another GPU."""

    def fxquant_tuning(self, device=None):
        return FAST_FBGEMM


def test_the_lowering_reads_the_row_through_inductors_choices_handler(fake_gpu):
    cuda = torch.device("cuda", 0)
    with V.set_choices_handler(InductorChoices()):  # Inductor's own (graphs that are not decode-shaped): the table
        assert tuning(cuda) is H200
    with V.set_choices_handler(WholeRowReductions()):
        assert tuning(cuda) is H200
    with V.set_choices_handler(TunedChoices()):
        tuned = tuning(cuda)
    assert tuned is FAST_FBGEMM
    assert heuristic_choice(512, 4096, fbgemm=True, tuned=tuned) == "fbgemm"
    assert heuristic_choice(512, 4096, fbgemm=True, tuned=H200) == "scaled_mm"


def persistent(choices: WholeRowReductions, numel: int) -> bool:
    features = SimpleNamespace(
        reduction_numel=sympy.Integer(numel), numel=sympy.Integer(1), get_reduction_hint=lambda: ReductionHint.INNER
    )
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
        return choices.should_use_persistent_reduction(features, cooperative_reduction=False)


def test_whole_rows_up_to_the_rows_limit(fake_gpu):
    assert persistent(WholeRowReductions(), H200.whole_row_limit) and not persistent(WholeRowReductions(), 14336)
    assert not persistent(TunedChoices(), 4096) and persistent(TunedChoices(), 2048)
    assert WholeRowReductions().uuid() != TunedChoices().uuid()  # a compiled graph's cache key says which tuning made it
