"""Merge: fxquant linears that read the same activation become one GEMM on their stacked weights.

    q = fp8_rowwise_linear(x, Wq, sq, None, ub)
    k = fp8_rowwise_linear(x, Wk, sk, None, ub)    →    qkv = fp8_rowwise_linear(x, W_qkv, s_qkv, None, ub)
    v = fp8_rowwise_linear(x, Wv, sv, None, ub)         q, k, v = split_with_sizes(qkv, [Nq, Nk, Nv], -1)

Llama's q/k/v and gate/up projections, merged as vLLM's QKVParallelLinear and
MergedColumnParallelLinear do by hand: the activation is quantized once, and one GEMM streams all
the weights where a small one alone (k, v: N = 1024) leaves most of the GPU idle at decode.
Two steps: `plan_merges` decides from the plan alone (so `fxquant.plan` shows it), before any
weight is quantized; `merge_parallel_linears` carries it out on the rewritten graph. Members are
linear sites (expert weights come fused as transformers stores them, gate_up_proj), read
one activation node with one scheme and the same options, have no bias, use a scheme whose tensors
stack along N (its `merge_dims`: scales per channel or per N-block, not one per tensor; the plan's
shape rule already made every N a whole number of blocks), and are quantized by fxquant from a
weight no other layer uses (stored weights arrive as graph inputs and stay as they are). The merged
node is the first member's SchemeCall on the stacked tensors, by name. Each member's quantized copy
becomes a view of the stacked buffers, so every weight is held once and a re-quantization writes
through.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import Tensor, fx
from torch._dynamo.utils import counters

from fxquant.passes.find_sites import fake_value
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.passes.quantize_weights import buffer_suffix
from fxquant.passes.rewrite_linears import buffer_node
from fxquant.scheme import get_scheme


def plan_merges(plan: Plan) -> None:
    """Mark the layers that will run as one GEMM: `merged_with` names the group, the note says it."""
    uses = Counter(id(entry.site.weight) for entry in plan)
    groups: dict[tuple, list[PlannedLinear]] = {}
    for entry in plan.rewritten:
        if (
            entry.stored is None
            and entry.site.kind == "linear"
            and get_scheme(entry.scheme).merge_dims
            and entry.site.bias is None
            and uses[id(entry.site.weight)] == 1
        ):
            groups.setdefault((entry.site.activation, entry.scheme, entry.options), []).append(entry)
    for members in (group for group in groups.values() if len(group) > 1):
        layers = tuple(member.layer for member in members)
        for member in members:
            member.merged_with = layers
            others = ", ".join(layer.rsplit(".", 1)[-1] for layer in layers if layer != member.layer)
            member.note = "; ".join(filter(None, [member.note, f"one GEMM with {others}"]))


def merge_parallel_linears(gm: fx.GraphModule, plan: Plan) -> None:
    """Replace each group `plan_merges` marked (rewritten by now) with one op on the stacked
    weights and a split of its output."""
    groups: dict[tuple[str, ...], list[PlannedLinear]] = {}
    for entry in plan.rewritten:
        if entry.merged_with:
            groups.setdefault(entry.merged_with, []).append(entry)
    for members in groups.values():
        _merge(gm, members)
    gm.graph.lint()
    gm.recompile()


def _stacked(parts: list[Tensor], dim: int) -> Tensor:
    """The parts concatenated along `dim`: the tensor they were split from when they are its split
    (stacked for another graph of the same model), else a new one."""
    base, sizes = parts[0]._base, [part.shape[dim] for part in parts]
    if (
        base is not None
        and sum(sizes) == base.shape[dim]
        and [p.data_ptr() for p in parts] == [p.data_ptr() for p in base.split(sizes, dim)]
        and all(p.shape == q.shape for p, q in zip(parts, base.split(sizes, dim)))
    ):
        return base
    return torch.cat(parts, dim)


def _merge(gm: fx.GraphModule, members: list[PlannedLinear]) -> None:
    graph = gm.graph
    position = {node: i for i, node in enumerate(graph.nodes)}
    members = sorted(members, key=lambda m: position[m.fused])
    quantized = [m.quantized for m in members]
    dims = get_scheme(members[0].scheme).merge_dims
    prefix = quantized[0].attrs["weight"].removesuffix("_weight") + "_merged"
    stacked = {}
    for name, dim in dims.items():
        stacked[name] = _stacked([q.tensors[name] for q in quantized], dim)
        gm.register_buffer(prefix + buffer_suffix(name), stacked[name])
    views = {name: stacked[name].split([q.tensors[name].shape[dim] for q in quantized], dim) for name, dim in dims.items()}
    for i, q in enumerate(quantized):
        q.hold_in({name: views[name][i] for name in dims})
    widths = [q.tensors["weight"].shape[dims["weight"]] for q in quantized]

    first = members[0]
    x = first.call.args[first.call.activation]
    with graph.inserting_before(first.fused):
        call = first.call.with_tensors({name: buffer_node(gm, prefix + buffer_suffix(name), x) for name in dims})
        merged = graph.call_function(call.op, call.node_args())
        parts = graph.call_function(torch.ops.aten.split_with_sizes.default, (merged, widths, -1))
        outputs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    _set_fake_values(merged, parts, [m.fused for m in members])
    for member, output in zip(members, outputs):
        old = member.fused
        buffers = [member.call.tensor(name) for name in member.call.tensors]
        output.meta.update(old.meta)
        old.replace_all_uses_with(output)
        graph.erase_node(old)
        for buffer in buffers:
            if isinstance(buffer, fx.Node) and not buffer.users:
                graph.erase_node(buffer)
                delattr(gm, buffer.target)
        member.fused, member.call = merged, call
    counters["fxquant"]["merged_linears"] += len(members)


def _set_fake_values(merged: fx.Node, parts: fx.Node, olds: list[fx.Node]) -> None:
    """The merged op's fake output: the members' outputs concatenated along N."""
    values = [fake_value(old) for old in olds]
    if any(v is None for v in values):
        return
    key = "val" if "val" in olds[0].meta else "example_value"
    with values[0].fake_mode:
        merged.meta[key] = torch.cat(values, dim=-1)
    parts.meta[key] = tuple(values)
