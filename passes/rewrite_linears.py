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

from fxquant.passes.find_linears import fake_value
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.passes.quantize_weights import buffer_suffix
from fxquant.passes.stored_weights import op_tensor
from fxquant.scheme import get_scheme


def buffer_node(gm: fx.GraphModule, attr: str, like: fx.Node) -> fx.Node:
    """A get_attr node for buffer `attr`, carrying a fake value the way `like` does."""
    node = gm.graph.get_attr(attr)
    fake = fake_value(like)
    if isinstance(fake, FakeTensor):
        key = "val" if "val" in like.meta else "example_value"
        node.meta[key] = fake.fake_mode.from_tensor(getattr(gm, attr), static_shapes=True)
    return node


def _stored_tensor(gm: fx.GraphModule, entry: PlannedLinear, name: str, like: fx.Node) -> fx.Node:
    """A stored tensor in the op's layout (HF's per-channel [N, 1] scale becomes [N]): a reshape of its
    graph input, or a buffer of `gm` when the graph has no such input."""
    stored, site = entry.stored[name], entry.site
    value = fake_value(stored) if isinstance(stored, fx.Node) else stored
    reshaped = op_tensor(entry.scheme, name, value, site.out_features, site.in_features, entry.options)
    if not isinstance(stored, fx.Node):
        attr = "fxquant_" + entry.layer.replace(".", "_") + "_stored" + buffer_suffix(name)
        gm.register_buffer(attr, reshaped)
        return buffer_node(gm, attr, like)
    if value.shape == reshaped.shape:
        return stored
    node = gm.graph.call_function(torch.ops.aten.reshape.default, (stored, list(reshaped.shape)))
    node.meta["val" if "val" in stored.meta else "example_value"] = reshaped
    return node


def rewrite_linears(gm: fx.GraphModule, plan: Plan) -> None:
    """Replace every planned linear node with its scheme's op (needs quantize_weights first)."""
    graph = gm.graph
    for entry in plan.rewritten:
        site, quantized = entry.site, entry.quantized
        with graph.inserting_before(site.node):
            if entry.stored is not None:
                tensors = {"weight": site.weight_node,
                           **{name: _stored_tensor(gm, entry, name, site.activation) for name in entry.stored}}
                values = None
            else:
                tensors = {name: buffer_node(gm, attr, site.activation) for name, attr in quantized.attrs.items()}
                values = quantized.tensors
            call = get_scheme(entry.scheme).call(entry.layer, site.activation, tensors, site.bias, entry.options, values)
            fused = graph.call_function(call.op, call.node_args())
        for node in tensors.values():
            if not node.users and node.op == "get_attr":  # a tensor folded into a constant argument
                graph.erase_node(node)
        fused.meta.update(site.node.meta)
        entry.fused, entry.call = fused, call
        site.node.replace_all_uses_with(fused)
        graph.erase_node(site.node)
        if site.view_node is not None and not site.view_node.users:
            graph.erase_node(site.view_node)
        counters["fxquant"][f"{entry.scheme}_linear"] += 1
    graph.lint()
    gm.recompile()
