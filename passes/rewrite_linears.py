"""Rewrite: each planned linear becomes one fused quantize-activation + low-precision GEMM op.

    y = linear(x, W, b)            →  y = fxquant.fp8_rowwise_linear(x, fxquant_<layer>_weight, fxquant_<layer>_scale, b, ub)
    t = W.t(); y = x @ t           →  y = fxquant.int8_linear(x, fxquant_<layer>_weight, fxquant_<layer>_scale, None)
    y = linear(x, W)   (static)    →  y = fxquant.fp8_tensorwise_static_linear(x, fxquant_<layer>_weight, 3.1e-05, None, 0.0123)
The weight's transpose, if nothing else uses it, goes with the matmul. The new node keeps the old
node's meta; the weight placeholder stays (Dynamo still passes it).
"""

from __future__ import annotations

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensor

from fxquant.config import QuantConfig
from fxquant.ops import LINEAR_SCHEMES
from fxquant.passes.find_linears import fake_value
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.passes.stored_weights import op_scale_shape


def buffer_node(gm: fx.GraphModule, attr: str, like: fx.Node) -> fx.Node:
    """A get_attr node for buffer `attr`, carrying a fake value the way `like` does."""
    node = gm.graph.get_attr(attr)
    fake = fake_value(like)
    if isinstance(fake, FakeTensor):
        key = "val" if "val" in like.meta else "example_value"
        node.meta[key] = fake.fake_mode.from_tensor(getattr(gm, attr), static_shapes=True)
    return node


def _stored_scale(gm: fx.GraphModule, entry: PlannedLinear, like: fx.Node) -> fx.Node:
    """The stored scale in the op's layout (HF's per-channel [N, 1] becomes [N], one element 0-dim):
    a reshape of the scale's graph input, or a buffer of `gm` when the graph has no such input."""
    scale, n = entry.stored_scale, entry.site.out_features
    value = fake_value(scale) if isinstance(scale, fx.Node) else scale
    shape = op_scale_shape(entry.scheme, tuple(value.shape), n)
    if not isinstance(scale, fx.Node):
        attr = "fxquant_" + entry.layer.replace(".", "_") + "_stored_scale"
        gm.register_buffer(attr, scale.reshape(shape))
        return buffer_node(gm, attr, like)
    if list(value.shape) == shape:
        return scale
    node = gm.graph.call_function(torch.ops.aten.reshape.default, (scale, shape))
    node.meta["val" if "val" in scale.meta else "example_value"] = value.reshape(shape)
    return node


def rewrite_linears(gm: fx.GraphModule, plan: Plan, config: QuantConfig) -> None:
    """Replace every planned linear node with its scheme's op (needs quantize_weights first)."""
    graph = gm.graph
    for entry in plan.rewritten:
        site, quantized = entry.site, entry.quantized
        scheme = LINEAR_SCHEMES[entry.scheme]
        with graph.inserting_before(site.node):
            if entry.stored_scale is not None:
                w_q, w_scale, w_scale_value = site.weight_node, _stored_scale(gm, entry, site.activation), None
            else:
                w_q = buffer_node(gm, quantized.weight_attr, site.activation)
                w_scale = buffer_node(gm, quantized.scale_attr, site.activation)
                w_scale_value = quantized.w_scale
            op, args = scheme.call(
                config, entry.layer, entry.activation_scale_ub, site.activation, w_q, w_scale, w_scale_value, site.bias
            )
            fused = graph.call_function(op, args)
        if not w_scale.users:  # the scale was folded into a constant argument
            graph.erase_node(w_scale)
        fused.meta.update(site.node.meta)
        entry.fused = fused
        site.node.replace_all_uses_with(fused)
        graph.erase_node(site.node)
        if site.view_node is not None and not site.view_node.users:
            graph.erase_node(site.view_node)
        counters["fxquant"][f"{entry.scheme}_linear"] += 1
    graph.lint()
    gm.recompile()


