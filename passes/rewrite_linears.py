"""Rewrite: each planned linear becomes one fused quantize-activation + low-precision GEMM op.

    y = linear(x, W, b)            →  y = fxquant.fp8_rowwise_linear(x, fxquant_<layer>_weight, fxquant_<layer>_scale, b, ub)
    t = W.t(); y = x @ t           →  y = fxquant.int8_linear(x, fxquant_<layer>_weight, fxquant_<layer>_scale, None)
    y = linear(x, W)   (static)    →  y = fxquant.fp8_tensorwise_static_linear(x, fxquant_<layer>_weight, 3.1e-05, None, 0.0123)
The weight's transpose, if nothing else uses it, goes with the matmul. The new node keeps the old
node's meta; the weight placeholder stays (Dynamo still passes it).
"""

from __future__ import annotations

from torch import fx
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensor

from fxquant.config import QuantConfig
from fxquant.ops import LINEAR_SCHEMES
from fxquant.passes.find_linears import fake_value
from fxquant.passes.plan_linears import Plan


def _constant(gm: fx.GraphModule, attr: str, like: fx.Node) -> fx.Node:
    """A get_attr node for buffer `attr`, carrying a fake value the way `like` does."""
    node = gm.graph.get_attr(attr)
    fake = fake_value(like)
    if isinstance(fake, FakeTensor):
        key = "val" if "val" in like.meta else "example_value"
        node.meta[key] = fake.fake_mode.from_tensor(getattr(gm, attr), static_shapes=True)
    return node


def rewrite_linears(gm: fx.GraphModule, plan: Plan, config: QuantConfig) -> None:
    """Replace every planned linear node with its scheme's op (needs quantize_weights first)."""
    graph = gm.graph
    for entry in plan.rewritten:
        site, quantized = entry.site, entry.quantized
        scheme = LINEAR_SCHEMES[entry.scheme]
        with graph.inserting_before(site.node):
            w_q = _constant(gm, quantized.weight_attr, site.activation)
            w_scale = _constant(gm, quantized.scale_attr, site.activation)
            op, args = scheme.call(config, entry.layer, site.activation, w_q, w_scale, quantized.w_scale, site.bias)
            fused = graph.call_function(op, args)
        if not w_scale.users:  # the scale was folded into a constant argument
            graph.erase_node(w_scale)
        fused.meta.update(site.node.meta)
        site.node.replace_all_uses_with(fused)
        graph.erase_node(site.node)
        if site.view_node is not None and not site.view_node.users:
            graph.erase_node(site.view_node)
        counters["fxquant"][f"{entry.scheme}_linear"] += 1
    graph.lint()
    gm.recompile()


