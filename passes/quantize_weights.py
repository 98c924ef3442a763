"""Quantize: turn each planned parameter into low-precision constants, once per parameter.

For every rewritten layer, registers on the GraphModule
    fxquant_<layer>_weight   [N, K] e4m3 / int8      fxquant_<layer>_scale   float32: [N] per channel,
                                                     [N/bn, K/bk] per block, [] per tensor
and records them on the plan entry. A parameter shared by several layers (tied weights) is
quantized once. The graph itself is not touched; the parameter is only read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx
from torch.utils.weak import WeakIdKeyDictionary

from fxquant.config import QuantConfig
from fxquant.ops import LINEAR_SCHEMES
from fxquant.passes.plan_linears import Plan

# parameter → {cache_key(...): (version, w_q, w_scale)}; lets the graphs Dynamo compiles
# for one model (static first, dynamic after) share one quantized copy of each weight.
QuantizedCache = WeakIdKeyDictionary


@dataclass
class QuantizedWeight:
    """A parameter's quantized copy, held as two buffers of a GraphModule."""

    scheme: str
    weight_is_kn: bool  # the parameter is stored [K, N]; its quantized copy is [N, K]
    weight_attr: str
    scale_attr: str
    w_q: Tensor
    w_scale: Tensor
    source: Tensor  # the parameter it was made from
    version: int  # source._version when it was made
    config: QuantConfig
    layers: list[str] = field(default_factory=list)

    def refresh(self, weight: Tensor) -> None:
        """Re-quantize from `weight` (the parameter changed in place, or was replaced) into the same buffers."""
        if LINEAR_SCHEMES[self.scheme].folds_weight_scale(self.config):
            raise RuntimeError(
                f"fxquant: the weight of {', '.join(self.layers)} changed after compilation, but its scale was "
                "folded into the compiled graph (static fp8_tensorwise); call torch._dynamo.reset() and compile again"
            )
        w_q, w_scale = quantize_parameter(self.layers[0], weight, self.weight_is_kn, self.scheme, self.config)
        self.w_q.copy_(w_q)
        self.w_scale.copy_(w_scale)
        self.source, self.version = weight, weight._version

    def hold_in(self, w_q: Tensor, w_scale: Tensor, cache: QuantizedCache | None) -> None:
        """Keep the quantized copy in `w_q` and `w_scale` from now on (views of a merged layer's
        buffers), in the cache too, so that the tensors it was made in can be freed."""
        self.w_q, self.w_scale = w_q, w_scale
        per_param = cache.get(self.source) if cache is not None else None
        key = cache_key(self.scheme, self.weight_is_kn, self.config)
        if per_param is not None and key in per_param:
            per_param[key] = (per_param[key][0], w_q, w_scale)


def cache_key(scheme: str, weight_is_kn: bool, config: QuantConfig) -> tuple:
    """What a parameter's quantized copy depends on besides the parameter: its QuantizedCache key."""
    return scheme, weight_is_kn, config.weight_block_size


def quantize_parameter(
    layer: str, weight: Tensor, weight_is_kn: bool, scheme: str, config: QuantConfig
) -> tuple[Tensor, Tensor]:
    """(w_q [N, K], w_scale) for `weight`; NaN or Inf in it is an error naming the layer."""
    with torch.no_grad():
        w = weight.detach().t() if weight_is_kn else weight.detach()
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"fxquant: layer '{layer}': weight {tuple(weight.shape)} holds {bad} NaN/Inf value(s); "
                "cannot quantize it. Fix the weight or add the layer to options['skip']."
            )
        w_q, w_scale = LINEAR_SCHEMES[scheme].quantize_weight(w, config)
        return w_q.contiguous(), w_scale.contiguous()


def _buffer_prefix(gm: fx.GraphModule, layer: str) -> str:
    prefix = "fxquant_" + re.sub(r"\W", "_", layer)
    candidate, n = prefix, 1
    while hasattr(gm, candidate + "_weight"):
        candidate, n = f"{prefix}_{n}", n + 1
    return candidate


def quantize_weights(
    gm: fx.GraphModule, plan: Plan, config: QuantConfig, cache: QuantizedCache | None = None
) -> list[QuantizedWeight]:
    """Quantize each parameter the plan rewrites into buffers of `gm`; returns them, one per parameter."""
    made: dict[tuple, QuantizedWeight] = {}
    for entry in plan.rewritten:
        if entry.stored_scale is not None:  # already quantized: used as stored
            continue
        site = entry.site
        key = cache_key(entry.scheme, site.weight_is_kn, config)
        quantized = made.get((id(site.weight), key))
        if quantized is None:
            per_param = cache.setdefault(site.weight, {}) if cache is not None else {}
            version, w_q, w_scale = per_param.get(key, (None, None, None))
            if version != site.weight._version:
                w_q, w_scale = quantize_parameter(entry.layer, site.weight, site.weight_is_kn, entry.scheme, config)
                per_param[key] = (site.weight._version, w_q, w_scale)
            prefix = _buffer_prefix(gm, entry.layer)
            gm.register_buffer(prefix + "_weight", w_q)
            gm.register_buffer(prefix + "_scale", w_scale)
            quantized = QuantizedWeight(
                entry.scheme, site.weight_is_kn, prefix + "_weight", prefix + "_scale",
                w_q, w_scale, site.weight, site.weight._version, config,
            )
            made[id(site.weight), key] = quantized
        quantized.layers.append(entry.layer)
        entry.quantized = quantized
    return list(made.values())
