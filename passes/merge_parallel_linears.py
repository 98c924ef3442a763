"""Merge: fxquant linears that read the same activation become one GEMM on their stacked weights.

    q = fp8_rowwise_linear(x, Wq, sq, None, ub)
    k = fp8_rowwise_linear(x, Wk, sk, None, ub)    →    qkv = fp8_rowwise_linear(x, W_qkv, s_qkv, None, ub)
    v = fp8_rowwise_linear(x, Wv, sv, None, ub)         q, k, v = split_with_sizes(qkv, [Nq, Nk, Nv], -1)

Llama's q/k/v and gate/up projections, merged as vLLM's QKVParallelLinear and
MergedColumnParallelLinear do by hand: the activation is quantized once, and one GEMM streams all
the weights where a small one alone (k, v: N = 1024) leaves most of the GPU idle at decode.
Two steps: `plan_merges` decides from the plan alone (so `fxquant.plan` shows it), before any
weight is quantized; `merge_parallel_linears` carries it out on the rewritten graph. Members read
one activation node with one scheme and activation bound, have no bias, scale their weights per
channel or per N-block (the scheme's `stacks_along_n`; the plan's shape rule already made every N a
whole number of blocks), and are quantized by fxquant from a weight no other layer uses (stored
weights arrive as graph inputs and stay as they are). Each member's quantized copy becomes a view
of the stacked buffers, so every weight is held once and a re-quantization writes through.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import Tensor, fx
from torch._dynamo.utils import counters

from fxquant.ops import LINEAR_SCHEMES
from fxquant.passes.find_linears import fake_value
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.passes.rewrite_linears import buffer_node


def plan_merges(plan: Plan) -> None:
    """Mark the layers that will run as one GEMM: `merged_with` names the group, the note says it."""
    uses = Counter(id(entry.site.weight) for entry in plan)
    groups: dict[tuple, list[PlannedLinear]] = {}
    for entry in plan.rewritten:
        if (
            entry.stored_scale is None
            and LINEAR_SCHEMES[entry.scheme].stacks_along_n
            and entry.site.bias is None
            and uses[id(entry.site.weight)] == 1
        ):
            groups.setdefault((entry.site.activation, entry.scheme, entry.activation_scale_ub), []).append(entry)
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


def _stacked(parts: list[Tensor]) -> Tensor:
    """The parts stacked along dim 0: the tensor they were split from when they are its split
    (stacked for another graph of the same model), else a new one."""
    base, rows = parts[0]._base, [part.shape[0] for part in parts]
    if (
        base is not None
        and sum(rows) == base.shape[0]
        and [p.data_ptr() for p in parts] == [p.data_ptr() for p in base.split(rows)]
        and all(p.shape == q.shape for p, q in zip(parts, base.split(rows)))
    ):
        return base
    return torch.cat(parts)


def _merge(gm: fx.GraphModule, members: list[PlannedLinear]) -> None:
    graph = gm.graph
    position = {node: i for i, node in enumerate(graph.nodes)}
    members = sorted(members, key=lambda m: position[m.fused])
    quantized = [m.quantized for m in members]
    w_q, w_scale = _stacked([q.w_q for q in quantized]), _stacked([q.w_scale for q in quantized])
    prefix = quantized[0].weight_attr.removesuffix("_weight") + "_merged"
    gm.register_buffer(prefix + "_weight", w_q)
    gm.register_buffer(prefix + "_scale", w_scale)
    widths = [q.w_q.shape[0] for q in quantized]
    scale_rows = [q.w_scale.shape[0] for q in quantized]
    for q, w_view, scale_view in zip(quantized, w_q.split(widths), w_scale.split(scale_rows)):
        q.hold_in(w_view, scale_view)

    first = members[0].fused
    x, _, _, bias, *rest = first.args
    with graph.inserting_before(first):
        merged = graph.call_function(
            first.target, (x, buffer_node(gm, prefix + "_weight", x), buffer_node(gm, prefix + "_scale", x), bias, *rest)
        )
        parts = graph.call_function(torch.ops.aten.split_with_sizes.default, (merged, widths, -1))
        outputs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    _set_fake_values(merged, parts, [m.fused for m in members])
    for member, output in zip(members, outputs):
        old = member.fused
        buffers = old.args[1:3]
        output.meta.update(old.meta)
        old.replace_all_uses_with(output)
        graph.erase_node(old)
        for buffer in buffers:
            if isinstance(buffer, fx.Node) and not buffer.users:
                graph.erase_node(buffer)
                delattr(gm, buffer.target)
        member.fused = merged
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
