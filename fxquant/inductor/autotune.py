"""What fxquant's lowerings share: Inductor's `autotune_select_algorithm` on every torch they run on,
sizes read as static or not, and the extern choices of their rowwise GEMMs."""

from __future__ import annotations

import torch
from torch._inductor import ir
from torch._inductor.select_algorithm import ExternKernelChoice, autotune_select_algorithm
from torch._inductor.virtualized import V


def select_node(name: str, choices: list, inputs: list, layout, **kwargs):
    """The IR node of the chosen kernel: torch 2.11 returns the node, torch >= 2.13 (node, choice)."""
    selected = autotune_select_algorithm(name, choices, inputs, layout, **kwargs)
    return selected[0] if isinstance(selected, tuple) else selected


def static_size(expr) -> int | None:
    """A size of an IR node as an int, or None where it is symbolic (known at run time only)."""
    try:
        return int(expr)
    except TypeError:
        return None


def gemm_layout(x_q, w_q, dtype: torch.dtype) -> ir.FixedLayout:
    """A rowwise GEMM's output: `dtype` [M, N] on x_q's device."""
    return ir.FixedLayout(x_q.get_device(), dtype, [x_q.get_size()[0], w_q.get_size()[0]])


def extern_gemm_choice(function, op_overload: torch._ops.OpOverload, name: str, dtype: torch.dtype) -> ExternKernelChoice:
    """An extern choice named `name` for a GEMM of (x_q, w_q, x_scale, w_scale) → `dtype` [M, N]:
    `function` in a Python wrapper, `op_overload` in a C++ wrapper (AOTInductor). Bound with
    `out_dtype=...`, the GEMM is called with it and its output has that dtype."""

    def create(x_q, w_q, x_scale, w_scale, **kwargs):
        if V.graph.cpp_wrapper:
            return ir.FallbackKernel.create(op_overload, x_q, w_q, x_scale, w_scale, **kwargs)
        return ir.ExternKernelAlloc(
            layout=gemm_layout(x_q, w_q, kwargs.get("out_dtype", dtype)), inputs=[x_q, w_q, x_scale, w_scale],
            kwargs=kwargs, python_kernel_name=f"extern_kernels.{name}",
        )

    return ExternKernelChoice(function, name=name, has_out_variant=False, op_overload=op_overload, kernel_creator=create)
