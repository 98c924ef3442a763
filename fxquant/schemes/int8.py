"""int8: symmetric int8 weights per output channel and activations per token, int32 accumulation
(`torch.ops.fxquant.int8_linear`, fxquant/ops/int8.py)."""

from __future__ import annotations

import torch

from fxquant.ops.int8 import quantize_int8_rowwise
from fxquant.scheme import register_scheme
from fxquant.schemes.common import PerChannelScale, ScaledWeight, ct_args


class Int8(PerChannelScale, ScaledWeight):
    name = "int8"
    tensors = {"weight": torch.int8, "weight_scale": torch.float32}

    def quantize_pair(self, weight, options):
        return quantize_int8_rowwise(weight)

    def call(self, layer, x, tensors, bias, options, values=None):
        return self.linear_call(torch.ops.fxquant.int8_linear.default, x, tensors, bias)

    def decompositions(self):
        from fxquant.inductor import int8_decompositions

        return {torch.ops.fxquant.int8_linear.default: int8_decompositions.int8_linear}

    def cache_key(self, options):
        return ()

    def hf_config(self, layout, options):
        if layout == "compressed-tensors":
            return {"format": "int-quantized", "weights": ct_args("int", "channel", False),
                    "input_activations": ct_args("int", "token", True)}
        return super().hf_config(layout, options)


register_scheme(Int8())
