"""fxquant's GEMM heuristic and config buckets (fxquant/inductor/fp8_rowwise_mm.py, the H100's row of
fxquant/inductor/tuning.py): what is picked when Inductor does not autotune, and the cache tag that
keeps Inductor from reusing code compiled for another choice."""

import logging

import pytest
import torch

from fxquant.inductor.cache_key import cache_key_tag
from fxquant.inductor.fp8_rowwise_mm import SMALL_M, heuristic_choice
from fxquant.inductor.tuning import H100

FBGEMM_MAX_ROWS, SPLITK_MAX_N = H100.fbgemm_max_rows, H100.splitk_max_n
configs_for, heuristic_config = H100.configs_for, H100.heuristic_config


def test_small_m_gets_fbgemm_and_larger_m_cublas(monkeypatch):
    monkeypatch.delenv("FXQUANT_GEMM", raising=False)
    ms = (1, SMALL_M, SMALL_M + 1, FBGEMM_MAX_ROWS, FBGEMM_MAX_ROWS + 1, 4096)
    assert [heuristic_choice(m, 4096, fbgemm=True, tuned=H100) for m in ms] == ["fbgemm"] * 4 + ["scaled_mm"] * 2
    assert heuristic_choice(None, 4096, fbgemm=True, tuned=H100) == "by_rows", "a dynamic M: the library is picked per call"


def test_without_fbgemm_decode_gets_fxquants_kernels(monkeypatch):
    """Split-K for one row of a narrow layer, the template for the other decode shapes, cuBLAS above."""
    monkeypatch.delenv("FXQUANT_GEMM", raising=False)
    cases = [(1, 4096, "splitk"), (1, SPLITK_MAX_N, "splitk"), (1, SPLITK_MAX_N + 1, "triton"), (2, 4096, "triton"),
             (SMALL_M, 4096, "triton"), (SMALL_M + 1, 4096, "scaled_mm"), (1, None, "triton")]
    assert [heuristic_choice(m, n, fbgemm=False, tuned=H100) for m, n, _ in cases] == [want for *_, want in cases]
    assert heuristic_choice(None, 4096, fbgemm=False, tuned=H100) == "by_rows"


def test_a_forced_choice_wins_and_a_wrong_one_is_an_error(monkeypatch):
    monkeypatch.setenv("FXQUANT_GEMM", "fbgemm")
    assert heuristic_choice(1, 4096, fbgemm=False, tuned=H100) == "fbgemm"
    monkeypatch.setenv("FXQUANT_GEMM", "cutlass")
    with pytest.raises(ValueError, match="FXQUANT_GEMM='cutlass'"):
        heuristic_choice(1, 4096, fbgemm=True, tuned=H100)


def test_forced_split_k_covers_decode_m_only_and_says_so_elsewhere(monkeypatch, caplog):
    monkeypatch.setenv("FXQUANT_GEMM", "splitk")
    assert heuristic_choice(1, 28672, fbgemm=True, tuned=H100) == heuristic_choice(SMALL_M, 4096, fbgemm=True, tuned=H100) == "splitk"
    with caplog.at_level(logging.WARNING, logger="fxquant"):
        assert heuristic_choice(SMALL_M + 1, 4096, fbgemm=False, tuned=H100) == "scaled_mm"
        assert heuristic_choice(None, 4096, fbgemm=True, tuned=H100) == "by_rows"
    assert any("FXQUANT_GEMM=splitk is for a static M <= 16, not M=17" in r.message for r in caplog.records)


def test_config_buckets_by_m():
    assert configs_for(1)[0].block_m == 16 and configs_for(16)[0].block_m == 16
    assert configs_for(17)[0].block_m == 64
    assert configs_for(1 << 20)[0].block_m == 128
    kwargs = configs_for(1)[0].template_kwargs(k=272)
    assert kwargs["EVEN_K"] is False and kwargs["BLOCK_K"] == 256


def test_decode_config_has_enough_programs_for_the_sms():
    """Without autotuning, M <= 16 uses what max-autotune picked on the H100 for Llama-3-8B's shapes."""
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        config = heuristic_config(1, n, k)
        assert config.block_m == 16 and n // config.block_n >= 128, (n, k, config)
    assert heuristic_config(1, 4096, 14336).block_k == 512
    assert heuristic_config(4096, 4096, 4096) == configs_for(4096)[0]


def test_compiled_code_is_cached_per_lowering_source_and_gemm_choice(monkeypatch):
    """The backend compiles CUDA graphs under this tag: a forced GEMM (or edited lowering code)
    must not reuse Inductor's cached code for another one; the user's own tag is kept."""
    monkeypatch.delenv("FXQUANT_GEMM", raising=False)
    heuristic = cache_key_tag()
    monkeypatch.setenv("FXQUANT_GEMM", "fbgemm")
    assert cache_key_tag() != heuristic and cache_key_tag().endswith(":fbgemm")
    with torch.compiler.config.patch(cache_key_tag="user-tag"):
        assert cache_key_tag().startswith("user-tag|fxquant:")


def test_compiled_code_is_cached_per_fbgemm_availability(monkeypatch):
    """The heuristic picks FBGEMM where it loads: code compiled there must not run where it does not."""
    from fxquant.inductor import cache_key

    tags = set()
    for available in (True, False):
        monkeypatch.setattr(cache_key, "fbgemm_genai_available", lambda: available)
        tags.add(cache_key_tag())
    assert len(tags) == 2
