"""Inductor lowering of fxquant::fp8_rowwise_mm: a choice of GEMM kernels per shape.

Choices (CUDA):
    fxquant's Triton template (fxquant/kernels/fp8_rowwise_gemm.py), one choice per config of M's bucket
    FBGEMM's `f8f8bf16_rowwise` (CUTLASS), where fbgemm-gpu-genai imports
    `torch._scaled_mm` (cuBLASLt)
    FBGEMM's or cuBLAS's by M at run time (`rowwise_mm_by_rows`), for an M known only then
    fxquant's split-K kernel (fxquant/kernels/fp8_rowwise_splitk.py), for a static M <= 16
Under max-autotune (`mode="max-autotune"`, or `max_autotune_gemm`) Inductor benchmarks the template,
FBGEMM, cuBLAS and (for a static M <= 16) split-K, and keeps the fastest. Otherwise fxquant's
heuristic picks one (`heuristic_choice`), by the GPU's tuning row (fxquant/inductor/tuning.py, read
through Inductor's choices handler).
`FXQUANT_GEMM=triton|fbgemm|scaled_mm|by_rows|splitk` forces a choice (benchmarks compare them
with it). Off CUDA the op stays a call to its reference implementation.

Each extern choice carries its op overload (fxquant/ops/fp8_rowwise.py), as Inductor's own do: a
Python wrapper (torch.compile) calls the function itself, `extern_kernels.fxquant_scaled_mm(...)`,
without a trip through the dispatcher (decode is bound by host time); a C++ wrapper (AOTInductor)
can call ops only, and calls the overload (a FallbackKernel, through AOTInductor's proxy executor).
"""

from __future__ import annotations

import logging
import os

import torch
from torch._inductor import config as inductor_config
from torch._inductor.lowering import fallback_handler, register_lowering
from torch._inductor.select_algorithm import ExternKernelChoice, realize_inputs

from fxquant.inductor.autotune import extern_gemm_choice, gemm_layout, select_node, static_size
from fxquant.inductor.choices import tuning
from fxquant.inductor.tuning import DeviceTuning
from fxquant.kernels.fp8_rowwise_gemm import fp8_rowwise_gemm_template
from fxquant.log import log_once
from fxquant.ops.availability import fbgemm_genai_available
from fxquant.ops.fp8_rowwise import fbgemm_rowwise_mm, fp8_rowwise_mm_splitk, rowwise_mm_by_rows, scaled_mm_rowwise

AUTOTUNED = ("triton", "fbgemm", "scaled_mm", "splitk")
CHOICES = (*AUTOTUNED, "by_rows")
SMALL_M = 16  # the template's decode configs and the split-K kernel cover M up to here


def _extern_gemm_choice(function, op_overload: torch._ops.OpOverload, name: str) -> ExternKernelChoice:
    return extern_gemm_choice(function, op_overload, name, torch.bfloat16)


scaled_mm_choice = _extern_gemm_choice(scaled_mm_rowwise, torch.ops.fxquant.scaled_mm_rowwise.default, "fxquant_scaled_mm")
fbgemm_choice = _extern_gemm_choice(
    fbgemm_rowwise_mm, torch.ops.fxquant.fbgemm_rowwise_mm.default, "fxquant_fbgemm_f8f8bf16_rowwise"
)
by_rows_choice = _extern_gemm_choice(rowwise_mm_by_rows, torch.ops.fxquant.fp8_rowwise_mm.default, "fxquant_rowwise_mm_by_rows")
splitk_choice = _extern_gemm_choice(
    fp8_rowwise_mm_splitk, torch.ops.fxquant.fp8_rowwise_mm_splitk.default, "fxquant_fp8_rowwise_mm_splitk"
)


def heuristic_choice(m: int | None, n: int | None, *, fbgemm: bool, tuned: DeviceTuning) -> str:
    """The kernel to use without autotuning, for a static M (None: M is dynamic, as for a batch size
    Dynamo saw change) and N (None: dynamic), where FBGEMM's GenAI ops import or not (`fbgemm`), on
    the GPU `tuned` describes.

    From benchmarks/gemm.py (benchmarks/RESULTS.md, fifth session): FBGEMM's GEMM is the fastest up
    to `fbgemm_max_rows` rows, decode included, and cuBLAS's above. Without FBGEMM, decode takes
    fxquant's kernels: split-K for one row and N <= `splitk_max_n`, the template otherwise. A
    dynamic M takes the run-time pick between FBGEMM and cuBLAS."""
    forced = os.environ.get("FXQUANT_GEMM")
    if forced:
        if forced not in CHOICES:
            raise ValueError(f"FXQUANT_GEMM={forced!r}: want one of {CHOICES}")
        if forced != "splitk" or (m is not None and m <= SMALL_M):
            return forced
        log_once(logging.WARNING, f"fxquant: FXQUANT_GEMM=splitk is for a static M <= {SMALL_M}, not "
                 f"M={'dynamic' if m is None else m}; that GEMM takes the heuristic's choice")
    if m is None:
        return "by_rows"
    if fbgemm and m <= tuned.fbgemm_max_rows:
        return "fbgemm"
    if m == 1 and n is not None and n <= tuned.splitk_max_n:
        return "splitk"
    return "triton" if m <= SMALL_M else "scaled_mm"


@register_lowering(torch.ops.fxquant.fp8_rowwise_mm.default, type_promotion_kind=None)
def tuned_fp8_rowwise_mm(x_q, w_q, x_scale, w_scale):
    if x_q.get_device().type != "cuda":
        return fallback_handler(torch.ops.fxquant.fp8_rowwise_mm.default, add_to_fallback_set=False)(x_q, w_q, x_scale, w_scale)
    inputs = realize_inputs(x_q, w_q, x_scale, w_scale)
    m, k = inputs[0].get_size()
    n = inputs[1].get_size()[0]
    layout = gemm_layout(inputs[0], inputs[1], torch.bfloat16)
    static_m, static_n, static_k = static_size(m), static_size(n), static_size(k)
    autotune = inductor_config.max_autotune or inductor_config.max_autotune_gemm
    fbgemm = fbgemm_genai_available()
    tuned = tuning(inputs[0].get_device())
    wanted = AUTOTUNED if autotune else (heuristic_choice(static_m, static_n, fbgemm=fbgemm, tuned=tuned),)
    if not fbgemm:
        wanted = tuple(c for c in wanted if c != "fbgemm") or ("scaled_mm",)
    if static_m is None or static_m > SMALL_M:
        wanted = tuple(c for c in wanted if c != "splitk")

    choices = []
    if "triton" in wanted and static_k is not None:
        for config in tuned.template_choices(static_m, static_n, static_k, autotune):
            fp8_rowwise_gemm_template.maybe_append_choice(
                choices, input_nodes=inputs, layout=layout, **config.template_kwargs(static_k)
            )
    if "fbgemm" in wanted:
        choices.append(fbgemm_choice.bind(inputs, layout))
    if "by_rows" in wanted:
        choices.append(by_rows_choice.bind(inputs, layout))
    if "splitk" in wanted:
        choices.append(splitk_choice.bind(inputs, layout))
    if "scaled_mm" in wanted or not choices:
        choices.append(scaled_mm_choice.bind(inputs, layout))
    return select_node("fxquant_fp8_rowwise_mm", choices, inputs, layout)
