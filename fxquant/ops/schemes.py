"""The table that ties a scheme name to its weight quantizer and its fused linear op.

Passes look a scheme up here, so adding a scheme means adding an op file and a row, not
touching the passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fxquant.config import QuantConfig
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.int8 import quantize_int8_rowwise


@dataclass(frozen=True)
class LinearScheme:
    """One quantization scheme for linear layers.

    Args:
        name: the QuantConfig.scheme value.
        quantize_weight: [N, K] float weight → (w_q [N, K], float32 scale [N]).
        linear_op: the fused quantize-activation + GEMM op, called as
            op(x, w_q, w_scale, bias, *extra_args(config)).
        extra_args: the op's trailing arguments taken from the config.
        uses_fp8: whether it needs FP8 tensor cores on a GPU.
    """

    name: str
    quantize_weight: Callable[[Tensor], tuple[Tensor, Tensor]]
    linear_op: Callable[..., Tensor]
    extra_args: Callable[[QuantConfig], tuple]
    uses_fp8: bool


LINEAR_SCHEMES = {
    "fp8_rowwise": LinearScheme(
        name="fp8_rowwise",
        quantize_weight=quantize_fp8_rowwise,
        linear_op=torch.ops.fxquant.fp8_rowwise_linear.default,
        extra_args=lambda config: (config.activation_scale_ub,),
        uses_fp8=True,
    ),
    "int8": LinearScheme(
        name="int8",
        quantize_weight=quantize_int8_rowwise,
        linear_op=torch.ops.fxquant.int8_linear.default,
        extra_args=lambda config: (),
        uses_fp8=False,
    ),
}
