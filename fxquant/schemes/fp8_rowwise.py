"""fp8_rowwise: e4m3 weights with one scale per output channel, e4m3 activations with one dynamic
scale per token (`torch.ops.fxquant.fp8_rowwise_linear`, fxquant/ops/fp8_rowwise.py; its CUDA
lowering: fxquant/inductor/). Expert weights [E, N, K] get one scale per expert and output channel,
run by the batched and grouped ops (fxquant/ops/fp8_rowwise_experts.py). Stored as HF
transformers' fbgemm_fp8 layout."""

from __future__ import annotations

import torch

from fxquant.hf_formats import NO_ACTIVATION_SCALE_UB
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise
from fxquant.scheme import register_scheme
from fxquant.schemes.common import Fp8Options, Fp8Scheme, PerChannelScale, ct_args, no_bound_in_compressed_tensors


class Fp8Rowwise(PerChannelScale, Fp8Scheme):
    name = "fp8_rowwise"
    Options = Fp8Options

    def quantize_pair(self, weight, options):
        return quantize_fp8_rowwise(weight)

    def call(self, layer, x, tensors, bias, options, values=None):
        op = torch.ops.fxquant.fp8_rowwise_linear.default
        return self.linear_call(op, x, tensors, bias, scale_ub=options.activation_scale_ub)

    def call_batched(self, layer, x, tensors, expert_ids, options, values=None):
        op = torch.ops.fxquant.fp8_rowwise_batched_mm.default
        return self.expert_call(op, x, tensors, expert_ids=expert_ids, scale_ub=options.activation_scale_ub)

    def call_grouped(self, layer, x, tensors, offsets, options, values=None):
        op = torch.ops.fxquant.fp8_rowwise_grouped_mm.default
        return self.expert_call(op, x, tensors, offsets=offsets, scale_ub=options.activation_scale_ub)

    def decompositions(self):
        from fxquant.inductor import decompositions

        return {
            torch.ops.fxquant.fp8_rowwise_linear.default: decompositions.fp8_rowwise_linear,
            torch.ops.fxquant.fp8_rowwise_grouped_mm.default: decompositions.fp8_rowwise_grouped_mm,
            torch.ops.fxquant.fp8_rowwise_batched_mm.default: decompositions.fp8_rowwise_batched_mm,
        }

    def cache_key(self, options):
        return ()  # the weight's quantization does not depend on the activation bound

    def hf_config(self, layout, options):
        if layout == "fbgemm_fp8":
            ub = options.activation_scale_ub
            return {"activation_scale_ub": NO_ACTIVATION_SCALE_UB if ub is None else ub}
        if layout == "compressed-tensors":
            no_bound_in_compressed_tensors(options)
            return {"format": "float-quantized", "weights": ct_args("float", "channel", False),
                    "input_activations": ct_args("float", "token", True)}
        return super().hf_config(layout, options)


register_scheme(Fp8Rowwise())
