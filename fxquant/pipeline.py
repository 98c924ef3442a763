"""The one place that decides the order of fxquant's passes.

    plan       find linear layers, decide scheme (rules, skip list,   (reads the graph only)
               scheme, fallback) or skip reason
    quantize   parameters → low-precision buffers on the module     (needs the plan's decisions)
    rewrite    linear nodes → fxquant ops reading those buffers     (needs the buffers)
    merge      ops on one activation → one op on stacked weights    (compiling only: `merge`;
               decided with the plan, carried out after the rewrite)
    gather     a grouped expert op on gathered rows → the op on the  (exact: a row's quantization is
               rows' source and their indices                       its own)
The weight transposes the rewrite leaves dead go with it, so there is no separate cleanup.
"""

from __future__ import annotations

from torch import fx

from fxquant.config import QuantConfig
from fxquant.passes import (
    Plan, WeightLookup, merge_parallel_linears, plan_linears, plan_merges, quantize_before_gathers, quantize_weights,
    rewrite_linears,
)
from fxquant.passes.quantize_weights import QuantizedCache, QuantizedWeight


def quantize_graph(
    gm: fx.GraphModule, lookup: WeightLookup, config: QuantConfig, cache: QuantizedCache | None = None, merge: bool = False
) -> tuple[Plan, list[QuantizedWeight]]:
    """Run fxquant's passes on `gm` in place; returns the plan and the quantized weights. `merge`
    (for compiling, where `config.merge_parallel_linears` allows it) stacks the weights of layers
    that share an input; an exported program keeps one op and its own buffers per layer."""
    merge = merge and config.merge_parallel_linears
    plan = plan_linears(gm, lookup, config)
    if merge:
        plan_merges(plan)
    quantized = quantize_weights(gm, plan, cache)
    rewrite_linears(gm, plan)
    if merge:
        merge_parallel_linears(gm, plan)
    quantize_before_gathers(gm)
    return plan, quantized
