"""fxquant's Inductor integration, installed once per process (`import fxquant` does it).

    torch.compile(model, backend="fxquant")               the backend compiles with Inductor's own table
    fxquant.aoti_compile_and_package(program)             AOTInductor, with the backend's settings
    torch._inductor.aoti_compile_and_package(program)     AOTInductor, with Inductor's defaults
    torch.compile(program.module())                       plain Inductor

In each, Inductor's decomposition table (`torch._inductor.decomposition.decompositions`) opens
the registered schemes' ops up on CUDA (each scheme's `decompositions`; the FP8 schemes' are in
fxquant/inductor/decompositions.py: the activation quantization
fuses into its producer, the rowwise GEMM becomes fxquant::fp8_rowwise_mm), and Inductor's lowerings
hold fp8_rowwise_mm's choice of kernels (fxquant/inductor/fp8_rowwise_mm.py). Elsewhere each
decomposition returns NotImplemented, which AOTAutograd's tracer takes as "keep the op whole"
(`maybe_handle_decomp` in torch/fx/experimental/proxy_tensor.py, alike in torch 2.11 and 2.13),
and Inductor calls the op (a fallback lowering registered with the decomposition): on the CPU the
ops run their reference implementation.

This is the one exception to fxquant's rule of no process-wide patching, and a safe one: every entry
is for one of fxquant's own ops, so no one else's op decomposes or lowers differently, and
registering the decompositions and lowerings of its custom ops is how a custom-op library
integrates with Inductor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch._inductor import decomposition as inductor_decomposition
from torch._inductor.lowering import constrain_to_fx_strides, make_fallback

from fxquant.inductor import division, fp8_rowwise_grouped_mm, fp8_rowwise_mm  # noqa: F401  (register the ops' lowerings)
from fxquant.scheme import SCHEMES

LOWERED_DEVICE_TYPES = frozenset({"cuda"})


def lowered_on(values: Iterable[object]) -> bool:
    """Whether any of `values` is a tensor on a device where fxquant's ops are lowered (CUDA)."""
    return any(isinstance(value, torch.Tensor) and value.device.type in LOWERED_DEVICE_TYPES for value in values)


def _where_lowered(decomposition: Callable) -> Callable:
    """`decomposition` for an activation on a lowered device; NotImplemented (the op stays whole) elsewhere.
    A decomposition may name its own devices (`lowered_device_types`, e.g. int8's: the CPU too)."""

    @functools.wraps(decomposition)
    def decompose(x, *args, **kwargs):
        devices = getattr(decomposition, "lowered_device_types", None) or LOWERED_DEVICE_TYPES
        lowered = isinstance(x, torch.Tensor) and x.device.type in devices
        return decomposition(x, *args, **kwargs) if lowered else NotImplemented

    return decompose


def scheme_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The decompositions of every registered scheme's ops (Scheme.decompositions), on any device."""
    return {op: fn for scheme in SCHEMES.values() for op, fn in scheme.decompositions().items()}


def install() -> None:
    """Add the registered schemes' decompositions to Inductor's table, each with a fallback lowering
    for where it declines (fp8_rowwise_mm's lowering is registered on import); a second call changes
    nothing, and a scheme registered since adds its own (the backend installs before each compile)."""
    table = inductor_decomposition.decompositions
    missing = {op: fn for op, fn in scheme_decompositions().items() if op not in table}
    for op, decomposition in missing.items():
        inductor_decomposition.register_decomposition(op)(_where_lowered(decomposition))
        # The op left whole is called as Inductor's implicit fallback would call it, with the traced
        # strides; Inductor makes that fallback itself only for ops without a decomposition.
        make_fallback(op, constrain_to_fx_strides, warn=False, override_decomp=True)
    if missing:  # select_decomp_table() returns a cached copy of the table, which may predate these
        inductor_decomposition.fast_random_decomps.cache_clear()
