"""Inductor lowering of fxquant::div_rn (fxquant/ops/division.py): a pointwise `ops.div_rn`, which
Triton writes as `tl.div_rn` whatever `eager_numerics.division_rounding` says, and the C++ backend as
its (correctly rounded) division. With Triton's approximate `/` (div.full.f32) instead, 1927 of
4,096,000 e4m3 codes of a [1000, 4096] bf16 input differed from FBGEMM's (H200).

A torch whose ops handler has no `div_rn` (2.11) gets the float64 quotient rounded to float32: Triton
and C++ divide float64 correctly rounded (div.rn.f64), and rounding a quotient of float32 values
twice, to 53 bits then to 24, gives the correctly rounded float32 quotient (double rounding of a
division is innocuous when 53 ≥ 2·24 + 2: Figueroa, "When is double rounding innocuous?", 1995).
Either way only the quantization's division is rounded so; every other division of the graph is
as plain torch.compile writes it."""

from __future__ import annotations

import torch
from torch._inductor.lowering import make_pointwise, register_lowering
from torch._inductor.ops_handler import OpsHandler
from torch._inductor.virtualized import ops

import fxquant.ops.division  # noqa: F401  (registers the op)

HAS_DIV_RN = hasattr(OpsHandler, "div_rn")


def _divide(a, b):
    if HAS_DIV_RN:
        return ops.div_rn(a, b)
    quotient = ops.truediv(ops.to_dtype(a, torch.float64), ops.to_dtype(b, torch.float64))
    return ops.to_dtype(quotient, torch.float32)


register_lowering(torch.ops.fxquant.div_rn.default, broadcast=True, type_promotion_kind=None)(make_pointwise(_divide))
