"""Observe: record each planned layer's activation amax, for static scales (calibration).

    y = linear(x, W, b)   →   observe(x, "layers.0.mlp.up_proj"); y = linear(x, W, b)
The observer returns nothing and changes nothing; the graph still computes in float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from fxquant.passes.plan_linears import Plan

# (activation, layer name) → None; called on every run of the observed graph.
Observer = Callable[[torch.Tensor, str], None]


def insert_observers(gm: fx.GraphModule, plan: Plan, observe: Observer) -> None:
    """Call `observe(activation, layer)` before every layer the plan would rewrite."""
    for entry in plan.rewritten:
        with gm.graph.inserting_before(entry.site.node):
            gm.graph.call_function(observe, (entry.site.activation, entry.layer))
    gm.recompile()
