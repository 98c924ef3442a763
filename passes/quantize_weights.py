"""Quantize: turn each planned parameter into its scheme's low-precision tensors, once per parameter.

For every rewritten layer, registers one buffer per tensor of its scheme on the GraphModule,
    fxquant_<layer>_weight   [N, K] e4m3 / int8 / ...     fxquant_<layer>_scale   ("weight_scale")   ...
(expert weights: [E, N, K] and the scheme's per-expert tensors)
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

from fxquant.passes.find_sites import GemmSite
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.scheme import get_scheme
from fxquant.tensor_parallel import is_dtensor, local, quantize_sharded
from fxquant.weight_stamp import WeightStamp


@dataclass(eq=False)
class QuantizedCopy:
    """A parameter's quantized tensors (by the scheme's names) and the stamp of the weight they were made
    from; the graphs Dynamo compiles for one model (static first, dynamic after) share it through the
    QuantizedCache."""

    tensors: dict[str, Tensor]
    stamp: WeightStamp


# parameter → {cache_key(...): QuantizedCopy}
QuantizedCache = WeakIdKeyDictionary


@dataclass(eq=False)
class QuantizedWeight:
    """A graph's use of a parameter's quantized copy: the copy and the names of its buffers."""

    scheme: str
    options: object  # the scheme's Options it was quantized (and is called) with
    weight_is_kn: bool  # the parameter is stored [K, N] ([E, K, N]); its quantized copy is [N, K] ([E, N, K])
    attrs: dict[str, str]  # the scheme's tensor name → the buffer holding it
    copy: QuantizedCopy
    cache: QuantizedCache | None
    layers: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> dict[str, Tensor]:
        return self.copy.tensors

    @property
    def source(self) -> Tensor | None:
        """The parameter the copy was made from (None once it is freed)."""
        return self.copy.stamp.source

    def refresh(self, weight: Tensor) -> None:
        """Re-quantize from `weight` (the parameter changed, or was replaced) into the same buffers, for
        every graph that shares them; the cache finds the copy under `weight` from now on."""
        if get_scheme(self.scheme).folds_tensors(self.options):
            raise RuntimeError(
                f"fxquant: the weight of {', '.join(self.layers)} changed after compilation, but its scale was folded "
                f"into the compiled graph ({self.scheme}, static scales); call torch._dynamo.reset() and compile again"
            )
        _requantize(self.copy, self.layers[0], weight, self.weight_is_kn, self.scheme, self.options)
        if self.cache is not None:
            self.cache.setdefault(weight, {})[cache_key(self.scheme, self.weight_is_kn, self.options)] = self.copy

    def hold_in(self, tensors: dict[str, Tensor]) -> None:
        """Keep the quantized copy in `tensors` from now on (views of a merged layer's buffers), for
        every graph that shares it, so that the tensors it was made in can be freed."""
        self.copy.tensors = tensors


def _requantize(copy: QuantizedCopy, layer: str, weight: Tensor, weight_is_kn: bool, scheme: str, options: object) -> None:
    for name, tensor in quantize_parameter(layer, weight, weight_is_kn, scheme, options).items():
        held = copy.tensors[name]  # a DTensor (a merged one around its view of the stack), or a plain tensor
        held.copy_(tensor if is_dtensor(held) else local(tensor))
    copy.stamp = WeightStamp(weight)
    counters["fxquant"]["requantized_weights"] += 1


def cache_key(scheme: str, weight_is_kn: bool, options: object) -> tuple:
    """What a parameter's quantized copy depends on besides the parameter: its QuantizedCache key (the
    scheme's part from its `cache_key`). A copy whose tensors a graph folds is never re-quantized in
    place, so such graphs share copies only among themselves."""
    plugin = get_scheme(scheme)
    return scheme, weight_is_kn, plugin.cache_key(options), plugin.folds_tensors(options)


def quantize_parameter(layer: str, weight: Tensor, weight_is_kn: bool, scheme: str, options: object) -> dict[str, Tensor]:
    """The scheme's tensors for `weight` ("weight" [N, K] or [E, N, K] first); NaN or Inf in it is an error
    naming the layer."""
    with torch.no_grad():
        w = weight.detach().transpose(-2, -1) if weight_is_kn else weight.detach()
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"fxquant: layer '{layer}': weight {tuple(weight.shape)} holds {bad} NaN/Inf value(s); "
                "cannot quantize it. Fix the weight or add the layer to options['skip']."
            )
        plugin = get_scheme(scheme)
        if is_dtensor(w):  # tensor parallel: each rank holds its slice of the whole weight's tensors
            return quantize_sharded(w, plugin, lambda whole: plugin.quantize(whole, options))
        return {name: tensor.contiguous() for name, tensor in plugin.quantize(w, options).items()}


def buffer_suffix(name: str) -> str:
    """A tensor's buffer suffix: "weight" → "_weight", "weight_scale" → "_scale"."""
    return "_weight" if name == "weight" else name.removeprefix("weight")


def _buffer_prefix(gm: fx.GraphModule, layer: str) -> str:
    prefix = "fxquant_" + re.sub(r"\W", "_", layer)
    candidate, n = prefix, 1
    while hasattr(gm, candidate + "_weight"):
        candidate, n = f"{prefix}_{n}", n + 1
    return candidate


def _current_copy(layer: str, site: GemmSite, entry: PlannedLinear, cache: QuantizedCache | None) -> QuantizedCopy:
    """The cached copy of the site's weight, re-quantized in place if the weight changed since it was
    made (a copy whose tensors graphs fold, or that lies on another device than the weight now does,
    as after `model.cuda()`, is replaced instead: the graphs compiled for the old device keep theirs);
    a new one if there is none."""
    key = cache_key(entry.scheme, site.weight_is_kn, entry.options)
    per_param = cache.setdefault(site.weight, {}) if cache is not None else {}
    copy = per_param.get(key)
    stale = copy is not None and not copy.stamp.matches(site.weight)
    moved = copy is not None and copy.tensors["weight"].device != site.weight.device
    if stale and not moved and not get_scheme(entry.scheme).folds_tensors(entry.options):
        _requantize(copy, layer, site.weight, site.weight_is_kn, entry.scheme, entry.options)
    elif copy is None or stale:
        tensors = quantize_parameter(layer, site.weight, site.weight_is_kn, entry.scheme, entry.options)
        copy = per_param[key] = QuantizedCopy(tensors, WeightStamp(site.weight))
    return copy


def quantize_weights(gm: fx.GraphModule, plan: Plan, cache: QuantizedCache | None = None) -> list[QuantizedWeight]:
    """Quantize each parameter the plan rewrites into buffers of `gm`; returns them, one per parameter."""
    made: dict[tuple, QuantizedWeight] = {}
    for entry in plan.rewritten:
        if entry.stored is not None:  # already quantized: used as stored
            continue
        site = entry.site
        key = cache_key(entry.scheme, site.weight_is_kn, entry.options)
        quantized = made.get((id(site.weight), key))
        if quantized is None:
            copy = _current_copy(entry.layer, site, entry, cache)
            prefix = _buffer_prefix(gm, entry.layer)
            attrs = {name: prefix + buffer_suffix(name) for name in copy.tensors}
            for name, attr in attrs.items():
                gm.register_buffer(attr, local(copy.tensors[name]) if site.reads_local_part else copy.tensors[name])
            quantized = QuantizedWeight(entry.scheme, entry.options, site.weight_is_kn, attrs, copy, cache)
            made[id(site.weight), key] = quantized
        quantized.layers.append(entry.layer)
        entry.quantized = quantized
    return list(made.values())
