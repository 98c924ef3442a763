"""The table that ties a scheme name to its weight quantizer, its shape rule and its fused op.

Passes look a scheme up here, so adding a scheme means adding an op file and a row, not
touching the passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fxquant.config import GEMM_ALIGNMENT, QuantConfig
from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight
from fxquant.ops.fp8_common import fp8_static_scale
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from fxquant.ops.int8 import quantize_int8_rowwise

ops = torch.ops.fxquant


def aligned(n: int, k: int, config: QuantConfig) -> str | None:
    """The GEMM kernels' rule: K and N multiples of 16."""
    for dim, size in (("K", k), ("N", n)):
        if size % GEMM_ALIGNMENT:
            return f"{dim}={size} not divisible by {GEMM_ALIGNMENT}"
    return None


def whole_blocks(n: int, k: int, config: QuantConfig) -> str | None:
    """fp8_blockwise: N and K whole multiples of the weight block."""
    block_n, block_k = config.weight_block_size
    for dim, size, block in (("K", k, block_k), ("N", n, block_n)):
        if size % block:
            return f"{dim}={size} not a multiple of the {block}-wide weight block"
    return None


@dataclass(frozen=True)
class LinearScheme:
    """One quantization scheme for linear layers.

    Args:
        name: the QuantConfig.scheme value.
        quantize_weight: (weight [N, K], config) → (w_q [N, K], float32 scale).
        shape_rule: (N, K, config) → why the kernels cannot take this shape, or None.
        call: (config, layer, scale_ub, x, w_q, w_scale, w_scale_value, bias) → (op, args): the node
            the rewrite emits; `scale_ub` the layer's activation_scale_ub; `w_scale_value` the
            weight scale's tensor, for schemes that fold it.
        uses_fp8: whether it needs FP8 tensor cores on a GPU.
        stacks_along_n: whether layers sharing an input can run as one layer whose weights and
            weight scales are theirs stacked along N (scales per channel or per N-block: yes;
            one scale per tensor: no).
    """

    name: str
    quantize_weight: Callable[[Tensor, QuantConfig], tuple[Tensor, Tensor]]
    shape_rule: Callable[[int, int, QuantConfig], str | None]
    call: Callable[..., tuple]
    uses_fp8: bool
    stacks_along_n: bool = True

    def folds_weight_scale(self, config: QuantConfig) -> bool:
        """Whether the weight scale becomes a graph constant (so a weight update needs a recompile)."""
        return self.name == "fp8_tensorwise" and config.static_activation_amax is not None

    def unsupported(self, layer: str, n: int, k: int, config: QuantConfig) -> str | None:
        """Why this scheme cannot quantize `layer` ([N, K]), or None."""
        if self.folds_weight_scale(config) and layer not in dict(config.static_activation_amax):
            return "no calibrated activation amax"
        return self.shape_rule(n, k, config)


def _with_scale_ub(op):
    def call(config, layer, scale_ub, x, w_q, w_scale, w_scale_value, bias):
        return op, (x, w_q, w_scale, bias, scale_ub)

    return call


def _int8_call(config, layer, scale_ub, x, w_q, w_scale, w_scale_value, bias):
    return ops.int8_linear.default, (x, w_q, w_scale, bias)


def _tensorwise_call(config, layer, scale_ub, x, w_q, w_scale, w_scale_value, bias):
    if config.static_activation_amax is None or w_scale_value is None:  # dynamic, or a stored weight
        return ops.fp8_tensorwise_linear.default, (x, w_q, w_scale, bias, scale_ub)
    x_scale = fp8_static_scale(dict(config.static_activation_amax)[layer], scale_ub)
    output_scale = x_scale * float(w_scale_value)  # the two static scales folded into one constant
    return ops.fp8_tensorwise_static_linear.default, (x, w_q, output_scale, bias, x_scale)


LINEAR_SCHEMES = {
    "fp8_rowwise": LinearScheme(
        "fp8_rowwise", lambda w, config: quantize_fp8_rowwise(w), aligned,
        _with_scale_ub(ops.fp8_rowwise_linear.default), uses_fp8=True,
    ),
    "fp8_blockwise": LinearScheme(
        "fp8_blockwise", lambda w, config: quantize_fp8_blockwise_weight(w, config.weight_block_size), whole_blocks,
        _with_scale_ub(ops.fp8_blockwise_linear.default), uses_fp8=True,
    ),
    "fp8_tensorwise": LinearScheme(
        "fp8_tensorwise", lambda w, config: quantize_fp8_tensorwise(w), aligned, _tensorwise_call, uses_fp8=True,
        stacks_along_n=False,
    ),
    "int8": LinearScheme("int8", lambda w, config: quantize_int8_rowwise(w), aligned, _int8_call, uses_fp8=False),
}
