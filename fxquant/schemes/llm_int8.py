"""llm_int8: bitsandbytes' LLM.int8 (load_in_8bit): int8 weights per output channel, int8
activations per token, the activation's columns holding any |x| >= `threshold` computed in 16-bit
against the dequantized weight columns (`torch.ops.fxquant.llm_int8_linear`, fxquant/ops/llm_int8.py).
threshold=0 is plain W8A8 int8 with bitsandbytes' rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.ops.llm_int8 import llm_int8_linear_aten, quantize_llm_int8_weight
from fxquant.scheme import Scheme, SchemeCall, register_scheme
from fxquant.schemes.common import aligned


@dataclass(frozen=True)
class LlmInt8Options:
    """threshold: an activation column with some |x| >= threshold runs in 16-bit (transformers'
    llm_int8_threshold, 6.0); 0: none does."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold < float("inf")):
            raise ValueError(f"fxquant: llm_int8 threshold must be a finite number >= 0, got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))


class LlmInt8(Scheme):
    name = "llm_int8"
    tensors = {"weight": torch.int8, "weight_absmax": torch.float32}  # weight_absmax: each row's max |W| (bnb's SCB)
    Options = LlmInt8Options
    merge_dims = {"weight": 0, "weight_absmax": 0}
    shard_dims = {"weight": (0, 1), "weight_absmax": (0, None)}  # outlier columns split with K, as the sums do

    def quantize(self, weight, options):
        w_q, absmax = quantize_llm_int8_weight(weight)
        return {"weight": w_q, "weight_absmax": absmax}

    def unsupported(self, layer, n, k, options):
        return aligned(n, k)

    def call(self, layer, x, tensors, bias, options, values=None):
        args = {"x": x, "w_q": tensors["weight"], "w_absmax": tensors["weight_absmax"], "bias": bias,
                "threshold": options.threshold}
        return SchemeCall(torch.ops.fxquant.llm_int8_linear.default, args, {"weight": "w_q", "weight_absmax": "w_absmax"})

    def decompositions(self):
        return {torch.ops.fxquant.llm_int8_linear.default: llm_int8_linear_aten}

    def cache_key(self, options):
        return ()  # the threshold acts on activations only


register_scheme(LlmInt8())
