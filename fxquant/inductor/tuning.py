"""Tuning constants per GPU: one row of numbers measured on each device, and how a device finds its row.

    field                    used by                                       what it bounds
    fbgemm_max_rows          fp8_rowwise_mm's lowering and CUDA kernel     FBGEMM's GEMM up to this M, cuBLAS's above
    splitk_max_n             the lowering's heuristic (no FBGEMM)          split-K for M = 1 up to this N
    splitk_programs_per_sm   fxquant/kernels/fp8_rowwise_splitk.py         how finely K is split
    template_configs         the Triton template under max-autotune        configs tried per M bucket
    decode_configs           the template without autotuning, M <= 16      the config per (N, K)
    whole_row_limit          fxquant/inductor/choices.py                   persistent reductions up to this row width
    int8_cublas_min_rows     int8_rowwise_mm's lowering and CUDA kernel    int8: fxquant's template below this M, cuBLAS from it

Where each was measured (benchmarks/RESULTS.md): every row is the H100's (80GB HBM3): the GEMM
choice, split-K and template configs in the fifth session (benchmarks/gemm.py on Llama-3-8B's
shapes), the whole-row limit in the seventh; the int8 bound and the first large-M config on the
H200 in the twelfth (benchmarks/int8_gemm.py). The H200 row is the H100's until measured otherwise:
the eighth session checked the whole-row limit there only against Inductor's default (0.8-0.9 %
less GPU time), not against other limits. Any other GPU takes `DEFAULT`, the H100's numbers but
cuBLAS's int8 GEMM above 128 rows.

The lowering and the choices read a row through Inductor's choices handler
(fxquant/inductor/choices.py: `tuning`), so a choices class of the user's can override it; run-time
kernels (the per-call FBGEMM/cuBLAS pick, split-K) read it by their tensors' device (`device_tuning`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch


class GemmConfig(NamedTuple):
    """One config of fxquant's FP8 rowwise Triton template (fxquant/kernels/fp8_rowwise_gemm.py)."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int

    def template_kwargs(self, k: int) -> dict:
        return {
            "BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": 8,
            "EVEN_K": k % self.block_k == 0, "num_stages": self.num_stages, "num_warps": self.num_warps,
        }


class DecodeConfig(NamedTuple):
    """The template's config without autotuning for M <= 16, where K >= min_k and N <= max_n."""

    min_k: int
    max_n: int
    config: GemmConfig


@dataclasses.dataclass(frozen=True)
class DeviceTuning:
    """The tuning constants of one GPU (the module docstring says what each bounds)."""

    name: str
    fbgemm_max_rows: int
    splitk_max_n: int
    splitk_programs_per_sm: int
    template_configs: Mapping[int, tuple[GemmConfig, ...]]  # M bucket's upper bound → configs, ascending
    decode_configs: tuple[DecodeConfig, ...]  # the first that fits (N, K); the last fits all
    whole_row_limit: int
    int8_cublas_min_rows: int = 129

    def configs_for(self, m: int) -> tuple[GemmConfig, ...]:
        """The template configs of the smallest M bucket that holds m."""
        return next(configs for bound, configs in self.template_configs.items() if m <= bound)

    def heuristic_config(self, m: int, n: int, k: int) -> GemmConfig:
        """The template config without autotuning: the first of m's bucket, or for M <= 16 the first
        decode config that fits (N, K)."""
        if m > min(self.template_configs):
            return self.configs_for(m)[0]
        return next(d.config for d in self.decode_configs if k >= d.min_k and n <= d.max_n)

    def template_choices(self, m: int | None, n: int, k: int, autotune: bool) -> tuple[GemmConfig, ...]:
        """The template configs a lowering offers: the heuristic's one without autotuning; under
        max-autotune m's bucket, or every bucket's configs where M is known only at run time."""
        if not autotune:
            return (self.heuristic_config(m or 2**62, n, k),)
        if m is not None:
            return self.configs_for(m)
        return tuple(config for bucket in self.template_configs.values() for config in bucket)


H100 = DeviceTuning(
    name="H100",
    # FBGEMM's GEMM beat cuBLAS's on every Llama-3-8B shape up to 128 rows, cuBLAS's won from M = 1024.
    fbgemm_max_rows=128,
    # Without FBGEMM, split-K beat the template at M = 1 on N <= 6144, lost at 28672.
    splitk_max_n=8192,
    splitk_programs_per_sm=4,
    template_configs={
        16: (GemmConfig(16, 32, 256, 6, 4), GemmConfig(16, 64, 256, 5, 4), GemmConfig(16, 32, 512, 4, 4),
             GemmConfig(16, 64, 128, 6, 4), GemmConfig(16, 128, 128, 5, 4)),
        128: (GemmConfig(64, 64, 128, 5, 4), GemmConfig(64, 128, 128, 4, 4), GemmConfig(32, 64, 256, 4, 4),
              GemmConfig(128, 64, 128, 4, 4)),
        # Serving batch sizes (decode with 129-512 sequences, chunked prefill): candidates for
        # max-autotune, to be measured (benchmarks/on_device.sh gemm-serving); wide N tiles, as few
        # programs per weight read as the SMs allow.
        512: (GemmConfig(128, 128, 128, 4, 8), GemmConfig(64, 128, 128, 4, 4), GemmConfig(128, 256, 128, 3, 8),
              GemmConfig(64, 256, 128, 4, 8)),
        # First: int8's pick at M = 2048 under max-autotune on the H200 (gate_up, down, o: 1.54x, 1.48x,
        # 1.41x over bf16, against 1.33x, 1.29x, 1.22x with 128 x 128 tiles; twelfth session). FP8 runs
        # FBGEMM's or cuBLAS's GEMM there unless autotuned or forced.
        2**62: (GemmConfig(128, 256, 128, 3, 8), GemmConfig(128, 128, 128, 4, 8), GemmConfig(64, 256, 128, 4, 4),
                GemmConfig(256, 128, 128, 3, 8)),
    },
    # What max-autotune picked for Llama-3-8B's shapes at M <= 16: enough programs along N to cover
    # the SMs (BLOCK_N = 32 up to N = 8192, 64 above), a long BLOCK_K for a long K (fewer loop trips).
    decode_configs=(
        DecodeConfig(8192, 2**62, GemmConfig(16, 32, 512, 4, 4)),
        DecodeConfig(0, 8192, GemmConfig(16, 32, 256, 6, 4)),
        DecodeConfig(0, 2**62, GemmConfig(16, 64, 256, 5, 4)),
    ),
    # RMSNorm + quantization rows of 4096 faster persistent; SiLU·mul's 14336 slower (seventh session).
    whole_row_limit=8192,
    # int8: fxquant's template (or its tiled kernel, M dynamic) at every M. cuBLAS's _int_mm runs an
    # sm80 kernel on Hopper: 1.06-1.20x over bf16 at M = 2048 on the H200, the template 1.22-1.54x
    # (gate_up, down, o; twelfth session); at M = 16 the template 1.38-1.70x.
    int8_cublas_min_rows=2**62,
)
H200 = dataclasses.replace(H100, name="H200")  # the int8 bound was measured here; the rest is the H100's
# Other GPUs: the H100's numbers, but cuBLAS's int8 GEMM above 128 rows (native on sm80, not measured here).
DEFAULT = dataclasses.replace(H100, name="default", int8_cublas_min_rows=129)

# GPU name pattern → row; the first that matches `torch.cuda.get_device_name` wins ("NVIDIA H100 80GB
# HBM3", "NVIDIA H200"; a GH200 is neither).
TUNING: dict[str, DeviceTuning] = {r"\bH100\b": H100, r"\bH200\b": H200}


def tuning_for(device_name: str) -> DeviceTuning:
    """The row for a GPU of this name; DEFAULT for one not in TUNING."""
    return next((row for pattern, row in TUNING.items() if re.search(pattern, device_name)), DEFAULT)


def device_tuning(device: torch.device | None = None) -> DeviceTuning:
    """The row for a CUDA device (None: the current one, if any); DEFAULT for any other device."""
    if device is None:
        return _cuda_tuning(torch.cuda.current_device()) if torch.cuda.is_available() else DEFAULT
    if device.type != "cuda":
        return DEFAULT
    return _cuda_tuning(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_tuning(index: int) -> DeviceTuning:
    """Memoized per device index: run-time kernels look their row up on every call."""
    return tuning_for(torch.cuda.get_device_name(index))
