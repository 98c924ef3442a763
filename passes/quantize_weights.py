"""Quantize: turn each planned parameter into low-precision constants, once per parameter.

For every rewritten layer, registers on the GraphModule
    fxquant_<layer>_weight   [N, K] e4m3 / int8      fxquant_<layer>_scale   float32: [N] per channel,
                                                     [N/bn, K/bk] per block, [] per tensor
and records them on the plan entry. A parameter shared by several layers (tied weights) is
quantized once. The graphs Dynamo compiles for one model share each copy through a QuantizedCache;
a cached copy whose parameter changed since it was made (fxquant/weight_stamp.py) is re-quantized
in place, for all of them. The graph itself is not touched; the parameter is only read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx
from torch._dynamo.utils import counters
from torch.utils.weak import WeakIdKeyDictionary

from fxquant.config import QuantConfig
from fxquant.ops import LINEAR_SCHEMES
from fxquant.passes.find_linears import LinearSite
from fxquant.passes.plan_linears import Plan
from fxquant.weight_stamp import WeightStamp


@dataclass(eq=False)
class QuantizedCopy:
    """A parameter's quantized tensors and the stamp of the weight they were made from; the graphs
    Dynamo compiles for one model (static first, dynamic after) share it through the QuantizedCache."""

    w_q: Tensor
    w_scale: Tensor
    stamp: WeightStamp


# parameter → {cache_key(...): QuantizedCopy}
QuantizedCache = WeakIdKeyDictionary


@dataclass(eq=False)
class QuantizedWeight:
    """A graph's use of a parameter's quantized copy: the copy and the names of its two buffers."""

    scheme: str
    weight_is_kn: bool  # the parameter is stored [K, N]; its quantized copy is [N, K]
    weight_attr: str
    scale_attr: str
    copy: QuantizedCopy
    config: QuantConfig
    cache: QuantizedCache | None
    layers: list[str] = field(default_factory=list)

    @property
    def w_q(self) -> Tensor:
        return self.copy.w_q

    @property
    def w_scale(self) -> Tensor:
        return self.copy.w_scale

    @property
    def source(self) -> Tensor | None:
        """The parameter the copy was made from (None once it is freed)."""
        return self.copy.stamp.source

    def refresh(self, weight: Tensor) -> None:
        """Re-quantize from `weight` (the parameter changed, or was replaced) into the same buffers, for
        every graph that shares them; the cache finds the copy under `weight` from now on."""
        if LINEAR_SCHEMES[self.scheme].folds_weight_scale(self.config):
            raise RuntimeError(
                f"fxquant: the weight of {', '.join(self.layers)} changed after compilation, but its scale was "
                "folded into the compiled graph (static fp8_tensorwise); call torch._dynamo.reset() and compile again"
            )
        _requantize(self.copy, self.layers[0], weight, self.weight_is_kn, self.scheme, self.config)
        if self.cache is not None:
            self.cache.setdefault(weight, {})[cache_key(self.scheme, self.weight_is_kn, self.config)] = self.copy

    def hold_in(self, w_q: Tensor, w_scale: Tensor) -> None:
        """Keep the quantized copy in `w_q` and `w_scale` from now on (views of a merged layer's
        buffers), for every graph that shares it, so that the tensors it was made in can be freed."""
        self.copy.w_q, self.copy.w_scale = w_q, w_scale


def _requantize(copy: QuantizedCopy, layer: str, weight: Tensor, weight_is_kn: bool, scheme: str, config: QuantConfig) -> None:
    w_q, w_scale = quantize_parameter(layer, weight, weight_is_kn, scheme, config)
    copy.w_q.copy_(w_q)
    copy.w_scale.copy_(w_scale)
    copy.stamp = WeightStamp(weight)
    counters["fxquant"]["requantized_weights"] += 1


def cache_key(scheme: str, weight_is_kn: bool, config: QuantConfig) -> tuple:
    """What a parameter's quantized copy depends on besides the parameter: its QuantizedCache key. A copy
    whose scale a graph folds is never re-quantized in place, so such graphs share copies only among
    themselves."""
    return scheme, weight_is_kn, config.weight_block_size, LINEAR_SCHEMES[scheme].folds_weight_scale(config)


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


def _current_copy(
    layer: str, site: LinearSite, scheme: str, config: QuantConfig, cache: QuantizedCache | None
) -> QuantizedCopy:
    """The cached copy of the site's weight, re-quantized in place if the weight changed since it was
    made (a copy whose scale graphs fold is replaced instead); a new one if there is none."""
    key = cache_key(scheme, site.weight_is_kn, config)
    per_param = cache.setdefault(site.weight, {}) if cache is not None else {}
    copy = per_param.get(key)
    stale = copy is not None and not copy.stamp.matches(site.weight)
    if stale and not LINEAR_SCHEMES[scheme].folds_weight_scale(config):
        _requantize(copy, layer, site.weight, site.weight_is_kn, scheme, config)
    elif copy is None or stale:
        w_q, w_scale = quantize_parameter(layer, site.weight, site.weight_is_kn, scheme, config)
        copy = per_param[key] = QuantizedCopy(w_q, w_scale, WeightStamp(site.weight))
    return copy


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
            copy = _current_copy(entry.layer, site, entry.scheme, config, cache)
            prefix = _buffer_prefix(gm, entry.layer)
            gm.register_buffer(prefix + "_weight", copy.w_q)
            gm.register_buffer(prefix + "_scale", copy.w_scale)
            quantized = QuantizedWeight(
                entry.scheme, site.weight_is_kn, prefix + "_weight", prefix + "_scale", copy, config, cache
            )
            made[id(site.weight), key] = quantized
        quantized.layers.append(entry.layer)
        entry.quantized = quantized
    return list(made.values())
