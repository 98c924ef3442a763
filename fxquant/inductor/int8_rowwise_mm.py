"""Inductor lowering of fxquant::int8_rowwise_mm (CUDA): a choice of int8 GEMM kernels per shape.

Choices:
    fxquant's Triton template (fxquant/kernels/int8_rowwise_gemm.py), one choice per config of M's bucket:
        int8 tensor cores, the scales in its epilogue and Inductor's epilogue (bias, cast) fused behind
    cuBLAS's `_int_mm` through Inductor's own lowering of aten._int_mm, the scales as Inductor pointwise
        code, which fuses with the bias and the cast into one kernel after the GEMM (static M > 16)
    fxquant's split-K kernel (fxquant/kernels/int8_rowwise_splitk.py), for a static M <= 16
    the split-K kernel or cuBLAS by M at run time (`int8_rowwise_mm_by_rows`), for an M known only then
Under max-autotune Inductor times the template's configs, split-K (M <= 16) and cuBLAS (with its
scales, as one extern call) and keeps the fastest. Otherwise `heuristic_choice` picks one by the GPU's
tuning row (fxquant/inductor/tuning.py). `FXQUANT_INT8_GEMM=triton|cublas|splitk|by_rows` forces one
(benchmarks). Off CUDA the op stays a call (on the CPU int8_linear's decomposition calls aten._int_mm
itself, fxquant/inductor/int8_decompositions.py).

The int32 sums are exact and every choice applies the scales in the reference's order, so every
choice gives the reference's bits (tests/kernels/test_cuda_int8.py).
"""

from __future__ import annotations

import logging
import os

import torch
from torch._inductor import config as inductor_config
from torch._inductor.lowering import fallback_handler, lowerings, register_lowering
from torch._inductor.select_algorithm import ExternKernelChoice, realize_inputs

from fxquant.inductor.autotune import extern_gemm_choice, gemm_layout, select_node, static_size
from fxquant.inductor.choices import tuning
from fxquant.inductor.tuning import DeviceTuning
from fxquant.kernels.int8_rowwise_gemm import int8_rowwise_gemm_template
from fxquant.log import log_once
from fxquant.ops.int8 import SPLITK_MAX_ROWS, int8_rowwise_mm_by_rows, int8_rowwise_mm_splitk, scaled_int_mm

CHOICES = ("triton", "cublas", "splitk", "by_rows")
LOWERED_DEVICE_TYPES = frozenset({"cuda"})  # elsewhere the op stays a call (tests widen it to run choices on the CPU)
aten, prims = torch.ops.aten, torch.ops.prims


def _extern_choice(function, name: str) -> ExternKernelChoice:
    """An extern choice: `function` in a Python wrapper, its op fxquant::<function name> in a C++ wrapper."""
    return extern_gemm_choice(function, getattr(torch.ops.fxquant, function.__name__).default, name, torch.float32)


cublas_choice = _extern_choice(scaled_int_mm, "fxquant_scaled_int_mm")
splitk_choice = _extern_choice(int8_rowwise_mm_splitk, "fxquant_int8_rowwise_mm_splitk")
by_rows_choice = _extern_choice(int8_rowwise_mm_by_rows, "fxquant_int8_rowwise_mm_by_rows")


def heuristic_choice(m: int | None, n: int | None, *, tuned: DeviceTuning) -> str:
    """The kernel without autotuning, for a static M (None: dynamic) and N on the GPU `tuned` describes:
    split-K for one row of N <= `splitk_max_n` (as FP8's, measured for FP8 on the H100), the template up
    to `int8_cublas_min_rows` rows, cuBLAS from there; the run-time pick for a dynamic M."""
    forced = os.environ.get("FXQUANT_INT8_GEMM")
    if forced:
        if forced not in CHOICES:
            raise ValueError(f"FXQUANT_INT8_GEMM={forced!r}: want one of {CHOICES}")
        if forced == "by_rows" or (m is not None and (forced != "splitk" or m <= SPLITK_MAX_ROWS)
                                   and (forced != "cublas" or m > SPLITK_MAX_ROWS)):
            return forced
        log_once(logging.WARNING, f"fxquant: FXQUANT_INT8_GEMM={forced} does not fit M={'dynamic' if m is None else m}; "
                 "that GEMM takes the heuristic's choice")
    if m is None:
        return "by_rows"
    if m == 1 and n is not None and n <= tuned.splitk_max_n:
        return "splitk"
    return "triton" if m < tuned.int8_cublas_min_rows else "cublas"


def _cublas_with_pointwise_scales(x_q, w_q, x_scale, w_scale, out_dtype: torch.dtype):
    """aten._int_mm by Inductor's own lowering (cuBLAS), then the scales and the cast to `out_dtype` as
    pointwise IR that Inductor fuses with what follows (bias, cast)."""
    acc = lowerings[aten._int_mm.default](x_q, lowerings[aten.permute.default](w_q, [1, 0]))
    y = lowerings[prims.convert_element_type.default](acc, torch.float32)
    y = lowerings[aten.mul.Tensor](y, lowerings[aten.unsqueeze.default](x_scale, 1))
    y = lowerings[aten.mul.Tensor](y, w_scale)
    return y if out_dtype == torch.float32 else lowerings[prims.convert_element_type.default](y, out_dtype)


@register_lowering(torch.ops.fxquant.int8_rowwise_mm.default, type_promotion_kind=None)
def tuned_int8_rowwise_mm(x_q, w_q, x_scale, w_scale, out_dtype: torch.dtype = torch.float32):
    if x_q.get_device().type not in LOWERED_DEVICE_TYPES:
        return fallback_handler(torch.ops.fxquant.int8_rowwise_mm.default, add_to_fallback_set=False)(
            x_q, w_q, x_scale, w_scale, out_dtype)
    inputs = realize_inputs(x_q, w_q, x_scale, w_scale)
    m, k = inputs[0].get_size()
    n = inputs[1].get_size()[0]
    static_m, static_n, static_k = static_size(m), static_size(n), static_size(k)
    autotune = inductor_config.max_autotune or inductor_config.max_autotune_gemm
    tuned = tuning(inputs[0].get_device())
    if not autotune:
        wanted = heuristic_choice(static_m, static_n, tuned=tuned)
        if wanted == "cublas":
            return _cublas_with_pointwise_scales(x_q, w_q, x_scale, w_scale, out_dtype)
        wanted = (wanted,)
    else:
        wanted = ("triton", "cublas", "splitk") if static_m is not None else ("triton", "by_rows")
    if static_m is None or static_m > SPLITK_MAX_ROWS:
        wanted = tuple(c for c in wanted if c != "splitk") or ("by_rows",)

    layout = gemm_layout(inputs[0], inputs[1], out_dtype)
    choices = []
    if "triton" in wanted and static_k is not None:
        for config in tuned.template_choices(static_m, static_n, static_k, autotune):
            int8_rowwise_gemm_template.maybe_append_choice(choices, input_nodes=inputs, layout=layout, **config.template_kwargs(static_k))
    for name, choice in (("cublas", cublas_choice), ("splitk", splitk_choice)):
        if name in wanted:
            choices.append(choice.bind(inputs, layout, out_dtype=out_dtype))
    if "by_rows" in wanted or not choices:
        choices.append(by_rows_choice.bind(inputs, layout, out_dtype=out_dtype))
    return select_node("fxquant_int8_rowwise_mm", choices, inputs, layout)
