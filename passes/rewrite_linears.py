"""Rewrite: each planned GEMM site becomes one fused quantize-activation + low-precision GEMM op.

    y = linear(x, W, b)            →  y = fxquant.fp8_rowwise_linear(x, fxquant_<layer>_weight, fxquant_<layer>_scale, b, ub)
    t = W.t(); y = x @ t           →  y = fxquant.int8_linear(x, fxquant_<layer>_weight, fxquant_<layer>_scale, None)
    y = linear(x, W)   (static)    →  y = fxquant.fp8_tensorwise_static_linear(x, fxquant_<layer>_weight, 3.1e-05, None, 0.0123)
    y = bmm(W[ids], x.unsqueeze(-1))  →  y = fxquant.fp8_rowwise_batched_mm(x.unsqueeze(-1).squeeze(2), W_q, s, ids, ub).unsqueeze(2)
    y = _grouped_mm(x, W.transpose(-2, -1), offs=o)  →  y = fxquant.fp8_rowwise_grouped_mm(x, W_q, s, o, ub)
    y = linear(x, W[e])   (indexed)  →  y = fxquant.fp8_rowwise_linear(x, index(W_q, [e]), index(s, [e]), None, ub)
The weight's conversions, transpose and gather, if nothing else uses them, go with the matmul. The new
node keeps the old node's meta; the weight placeholder stays (Dynamo still passes it).
"""

from __future__ import annotations

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensor

from fxquant.passes.find_sites import GemmSite, fake_value
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.passes.quantize_weights import buffer_suffix
from fxquant.passes.stored_weights import op_tensor
from fxquant.scheme import SchemeCall, get_scheme
from fxquant.tensor_parallel import is_dtensor, register_op_sharding


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
    if site.experts is not None:  # expert tensors are stored in the op's layout
        reshaped = value
    else:
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


def aten_node(graph: fx.Graph, op: torch._ops.OpOverload, args: tuple, like: fx.Node) -> fx.Node:
    """`op(*args)` on fake values, carrying its fake value the way `like` does."""
    node = graph.call_function(op, args)
    fake = lambda a: a.meta.get("val", a.meta.get("example_value")) if isinstance(a, fx.Node) else a  # noqa: E731
    fake_args = [[fake(b) for b in a] if isinstance(a, list) else fake(a) for a in args]
    node.meta["val" if "val" in like.meta else "example_value"] = op(*fake_args)
    return node


def _selected(graph: fx.Graph, tensors: dict[str, fx.Node], index: object, like: fx.Node) -> dict[str, fx.Node]:
    """Each per-expert tensor [E, ...] at expert `index` (an int or SymInt: select; a 0-d tensor: index)."""
    if isinstance(index, fx.Node) and isinstance(fake_value(index), torch.Tensor):
        return {name: aten_node(graph, torch.ops.aten.index.Tensor, (t, [index]), like) for name, t in tensors.items()}
    return {name: aten_node(graph, torch.ops.aten.select.int, (t, 0, index), like) for name, t in tensors.items()}


def _scheme_call(entry: PlannedLinear, site: GemmSite, x: fx.Node, tensors: dict, values: dict | None) -> SchemeCall:
    """The scheme's op node for the site's kind (an indexed site: the linear op on its expert's tensors)."""
    scheme = get_scheme(entry.scheme)
    if site.kind == "batched":
        return scheme.call_batched(entry.layer, x, tensors, site.expert_ids, entry.options, values)
    if site.kind == "grouped":
        return scheme.call_grouped(entry.layer, x, tensors, site.offsets, entry.options, values)
    return scheme.call(entry.layer, x, tensors, site.bias, entry.options, values)


def rewrite_linears(gm: fx.GraphModule, plan: Plan) -> None:
    """Replace every planned site's node with its scheme's op (needs quantize_weights first). A batched
    site's bmm on [S, 1, K] or [S, K, 1] rows becomes the op on [S, K] (a squeeze before, an unsqueeze
    after); each indexed site of a row (W[e] for every e a loop reaches) becomes the linear op on the
    per-expert tensors at e."""
    for entry in plan.rewritten:
        for site in entry.sites:
            _rewrite_site(gm, entry, site)
    gm.graph.lint()
    gm.recompile()


def _rewrite_site(gm: fx.GraphModule, entry: PlannedLinear, site: GemmSite) -> None:
    graph = gm.graph
    with graph.inserting_before(site.node):
        if entry.stored is not None:
            tensors = {"weight": site.weight_node,
                       **{name: _stored_tensor(gm, entry, name, site.activation) for name in entry.stored}}
            values = None
        else:
            tensors = {name: buffer_node(gm, attr, site.activation) for name, attr in entry.quantized.attrs.items()}
            values = entry.quantized.tensors
        x = site.activation
        unit_dim = site.unit_dim
        if unit_dim is not None:
            x = aten_node(graph, torch.ops.aten.squeeze.dim, (x, unit_dim), site.activation)
        if site.kind == "indexed":
            tensors, values = _selected(graph, tensors, site.expert_index, site.activation), None
        call = _scheme_call(entry, site, x, tensors, values)
        if is_dtensor(site.weight):
            register_op_sharding(call)
        fused = graph.call_function(call.op, call.node_args())
        fused.meta.update(site.node.meta)
        output = fused
        if unit_dim is not None:
            fused.meta["val" if "val" in site.node.meta else "example_value"] = fake_value(site.node).squeeze(unit_dim)
            output = aten_node(graph, torch.ops.aten.unsqueeze.default, (fused, unit_dim), site.node)
            output.meta.update({k: v for k, v in site.node.meta.items() if k not in output.meta})
    for node in tensors.values():
        if not node.users and node.op == "get_attr":  # a tensor folded into a constant argument
            graph.erase_node(node)
    if site is entry.site:
        entry.fused, entry.call = fused, call
    site.node.replace_all_uses_with(output)
    graph.erase_node(site.node)
    _erase_dead(graph, [site.view_node, site.gather_node, *site.convert_nodes])
    counters["fxquant"][f"{entry.scheme}_{site.kind}"] += 1


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node | None]) -> None:
    """Erase the weight's transpose, gather and conversions that nothing else uses (each frees the next)."""
    left = [node for node in nodes if node is not None]
    while dead := [node for node in left if not node.users]:
        for node in dead:
            graph.erase_node(node)
            left.remove(node)
