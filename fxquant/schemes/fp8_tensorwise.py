"""fp8_tensorwise: e4m3 weights and activations with one scale per tensor, the activation's dynamic
or static from calibration (`torch.ops.fxquant.fp8_tensorwise_linear` / `fp8_tensorwise_static_linear`,
fxquant/ops/fp8_tensorwise.py). Static scales are folded into the graph as constants."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.ops.fp8_common import fp8_static_scale
from fxquant.ops.fp8_tensorwise import quantize_fp8_tensorwise
from fxquant.scheme import NoHFLayout, SchemeCall, register_scheme
from fxquant.schemes.common import Fp8Scheme, aligned, check_scale_ub

ops = torch.ops.fxquant


@dataclass(frozen=True)
class Fp8TensorwiseOptions:
    """activation_scale_ub: as fp8_rowwise's; static_activation_amax: ((layer, amax), ...) from
    `fxquant.calibrate`, or None for dynamic activation scales."""

    activation_scale_ub: float | None = None
    static_activation_amax: tuple[tuple[str, float], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation_scale_ub", check_scale_ub(self.activation_scale_ub))
        if self.static_activation_amax is not None:
            amax = dict(self.static_activation_amax)
            bad = {layer: value for layer, value in amax.items() if not (isinstance(value, (int, float)) and 0 < value < float("inf"))}
            if bad:
                raise ValueError(f"fxquant: static_activation_amax values must be positive and finite: {bad}")
            object.__setattr__(self, "static_activation_amax", tuple(sorted((k, float(v)) for k, v in amax.items())))


class Fp8Tensorwise(Fp8Scheme):
    name = "fp8_tensorwise"
    Options = Fp8TensorwiseOptions
    shard_dims = {"weight": (0, 1)}  # the scale is the whole weight's, on every rank

    def quantize_pair(self, weight, options):
        return quantize_fp8_tensorwise(weight)

    def unsupported(self, layer, n, k, options):
        if self.folds_tensors(options) and layer not in dict(options.static_activation_amax):
            return "no calibrated activation amax"
        return aligned(n, k)

    def call(self, layer, x, tensors, bias, options, values=None):
        if not self.folds_tensors(options) or values is None:  # dynamic, or a stored weight
            return self.linear_call(ops.fp8_tensorwise_linear.default, x, tensors, bias, scale_ub=options.activation_scale_ub)
        x_scale = fp8_static_scale(dict(options.static_activation_amax)[layer], options.activation_scale_ub)
        output_scale = x_scale * float(values["weight_scale"])  # the two static scales folded into one constant
        return SchemeCall(ops.fp8_tensorwise_static_linear.default, {
            "x": x, "w_q": tensors["weight"], "output_scale": output_scale, "bias": bias, "x_scale": x_scale},
            {"weight": "w_q"})

    def decompositions(self):
        from fxquant.inductor import decompositions

        return {ops.fp8_tensorwise_linear.default: decompositions.fp8_tensorwise_linear,
                ops.fp8_tensorwise_static_linear.default: decompositions.fp8_tensorwise_static_linear}

    def folds_tensors(self, options):
        return options.static_activation_amax is not None

    def cache_key(self, options):
        return self.folds_tensors(options)  # graphs that fold the scale share copies only among themselves

    def hf_config(self, layout, options):
        if layout == "compressed-tensors":
            raise NoHFLayout("fxquant: compressed-tensors has no dynamic fp8_tensorwise layout")
        return super().hf_config(layout, options)

    def op_shape(self, name, shape, n, k, options):
        """One scale for the tensor, whichever way a checkpoint shapes it ([], [1], [1, 1])."""
        if name == "weight":
            return shape if shape == (n, k) else None
        return () if name == "weight_scale" and len(shape) <= 2 and all(size == 1 for size in shape) else None


register_scheme(Fp8Tensorwise())
