"""Inductor lowering of fxquant::div_rn (fxquant/ops/division.py): a pointwise `ops.div_rn`, which
Triton writes as `tl.div_rn` whatever `eager_numerics.division_rounding` says, and the C++ backend as
its (correctly rounded) division. Torch versions whose ops handler has no `div_rn` get a plain
division, and fxquant's settings turn `division_rounding` on for the whole graph there
(fxquant/inductor/settings.py)."""

from __future__ import annotations

import torch
from torch._inductor.lowering import make_pointwise, register_lowering
from torch._inductor.ops_handler import OpsHandler
from torch._inductor.virtualized import ops

import fxquant.ops.division  # noqa: F401  (registers the op)

HAS_DIV_RN = hasattr(OpsHandler, "div_rn")


def _divide(a, b):
    return ops.div_rn(a, b) if HAS_DIV_RN else ops.truediv(a, b)


register_lowering(torch.ops.fxquant.div_rn.default, broadcast=True, type_promotion_kind=None)(make_pointwise(_divide))
