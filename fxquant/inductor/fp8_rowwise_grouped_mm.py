"""Inductor lowering of fxquant::fp8_rowwise_grouped_gemm (MoE experts): a choice of grouped GEMMs.

Choices (CUDA; fxquant/ops/fp8_rowwise_grouped_gemm.py):
    fbgemm              FBGEMM's `f8f8bf16_rowwise_grouped_stacked`, where fbgemm-gpu-genai imports and N, K are multiples of 16
    scaled_grouped_mm   `torch._scaled_grouped_mm`, where torch has it (same shapes)
    triton              fxquant's Triton kernel (fxquant/kernels/fp8_rowwise_grouped_gemm.py), any shape
    by_shape            the op's own CUDA kernel: one of the above picked at run time by rows per expert
Under max-autotune Inductor times every kernel on offsets that spread the rows evenly over the experts
and keeps the fastest. Otherwise `kernel_for` picks by rows per expert (the Triton kernel at few, the
first library kernel at many: measured per shape, benchmarks/moe.py's kernel table), at compile time
for static rows and at run time (by_shape) for a dynamic batch. `FXQUANT_GROUPED_GEMM=
scaled_grouped_mm|fbgemm|triton` forces one where it can run. Off CUDA the op stays a call to its
reference implementation.

Each choice is an extern kernel carrying its op overload, as fp8_rowwise_mm's are
(fxquant/inductor/fp8_rowwise_mm.py): the Python wrapper calls the function, AOTInductor's C++ wrapper
the op.
"""

from __future__ import annotations

import logging
import os

import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.lowering import fallback_handler, register_lowering
from torch._inductor.select_algorithm import ExternKernelChoice, realize_inputs
from torch._inductor.virtualized import V

from fxquant.inductor.autotune import select_node, static_size
from fxquant.log import log_once
from fxquant.ops.fp8_rowwise_grouped_gemm import KERNELS, available_kernels, grouped_gemm_by_shape, kernel_for

OP = torch.ops.fxquant.fp8_rowwise_grouped_gemm.default
OFFSETS_INPUT = 4


def _layout(x_q, w_q) -> ir.FixedLayout:
    """The GEMM's output: bf16 [S, N] on x_q's device."""
    return ir.FixedLayout(x_q.get_device(), torch.bfloat16, [x_q.get_size()[0], w_q.get_size()[1]])


def _extern_choice(kernel: str) -> ExternKernelChoice:
    function = KERNELS.get(kernel, grouped_gemm_by_shape)
    op_overload = getattr(torch.ops.fxquant, function.__name__).default
    name = f"fxquant_grouped_{kernel}"

    def create(*inputs):
        if V.graph.cpp_wrapper:
            return ir.FallbackKernel.create(op_overload, *inputs)
        return ir.ExternKernelAlloc(layout=_layout(inputs[0], inputs[1]), inputs=list(inputs),
                                    python_kernel_name=f"extern_kernels.{name}")

    return ExternKernelChoice(function, name=name, has_out_variant=False, op_overload=op_overload, kernel_creator=create)


EXTERN_CHOICES = {kernel: _extern_choice(kernel) for kernel in (*KERNELS, "by_shape")}


def wanted_kernels(n: int, k: int, *, autotune: bool, rows: int | None = None, experts: int = 1) -> tuple[str, ...]:
    """The kernels to offer for `rows` rows (None: known at run time only) over `experts` experts of
    N x K: all that run under max-autotune, else the one `kernel_for` picks (by_shape: at run time)."""
    available = available_kernels(n, k)
    forced = os.environ.get("FXQUANT_GROUPED_GEMM")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"FXQUANT_GROUPED_GEMM={forced!r}: want one of {tuple(KERNELS)}")
        if forced in available:
            return (forced,)
        log_once(logging.WARNING, f"fxquant: FXQUANT_GROUPED_GEMM={forced} cannot run an expert weight of N={n}, "
                 f"K={k} here; that GEMM takes {available[0]}")
    if autotune:
        return available
    return ("by_shape",) if rows is None else (kernel_for(rows, experts, n, k),)


def even_offsets(rows: int, experts: int, device) -> torch.Tensor:
    """Cumulative rows per expert with `rows` spread evenly (what autotuning times the choices on)."""
    return (torch.arange(1, experts + 1, dtype=torch.int64) * rows // experts).to(torch.int32).to(device)


@register_lowering(OP, type_promotion_kind=None)
def tuned_fp8_rowwise_grouped_gemm(x_q, w_q, x_scale, w_scale, offsets):
    if x_q.get_device().type != "cuda":
        return fallback_handler(OP, add_to_fallback_set=False)(x_q, w_q, x_scale, w_scale, offsets)
    inputs = realize_inputs(x_q, w_q, x_scale, w_scale, offsets)
    try:
        experts, n, k = (int(size) for size in inputs[1].get_size())  # static for parameters and buffers
    except TypeError:  # a weight of symbolic shape: the op's own CUDA kernel picks by shape at run time
        return fallback_handler(OP, add_to_fallback_set=False)(*inputs)
    layout = _layout(inputs[0], inputs[1])
    autotune = inductor_config.max_autotune or inductor_config.max_autotune_gemm
    static_rows = static_size(inputs[0].get_size()[0])
    kernels = wanted_kernels(n, k, autotune=autotune, rows=static_rows, experts=experts)
    choices = [EXTERN_CHOICES[kernel].bind(inputs, layout) for kernel in kernels]
    sizevars = V.graph.sizevars
    hint = getattr(sizevars, "optimization_hint", None) or sizevars.size_hint  # torch 2.13 / torch 2.11
    rows = hint(inputs[0].get_size()[0], fallback=experts * 16)
    gen = {OFFSETS_INPUT: lambda buffer: even_offsets(rows, experts, buffer.get_device())}
    return select_node("fxquant_fp8_rowwise_grouped_gemm", choices, inputs, layout, input_gen_fns=gen)
