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
shape rule already made every N a whole number of blocks), and hold a weight no other layer uses,
all quantized by fxquant or all stored quantized in their modules (`load_quantized`, `quantize_`).
The merged node is the first member's SchemeCall on the stacked tensors, by name. Each member's
quantized copy, or each stored module tensor (its `.data`: the same tensor object and values),
becomes a view of the stacked buffers (stored ones once the graph is compiled:
`hold_stored_in_stacks`), so every weight is held once, a re-quantization writes through, and
another graph of the same model finds them stacked already.

Tensor parallel (fxquant/tensor_parallel.py): layers that read `w.to_local()` (transformers) stack
their local parts as above. parallelize_module's column-wise layers are ops on DTensors, each framed
by its hooks (`DTensor.from_local(x, mesh, [Replicate()])` in, `.to_local()` out), so each already
runs the local op on x and its rows: they merge into one op on x and the stack of their local parts,
whose split replaces each `.to_local()`; no collective is added or removed. A merged copy of a
DTensor weight stays a DTensor around its view, for graphs that run it unmerged. Row-wise layers
(partial sums) are not merged; a column-wise one whose output is read as a DTensor, or whose input
is redistributed by a collective, stays alone and says why in the plan.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections import Counter

import torch
from torch import Tensor, fx
from torch._dynamo.utils import counters

from fxquant.passes.find_sites import fake_value
from fxquant.passes.plan_linears import Plan, PlannedLinear
from fxquant.passes.quantize_weights import buffer_suffix
from fxquant.passes.rewrite_linears import buffer_node
from fxquant.passes.stored_weights import STORED_WEIGHTS, op_tensor
from fxquant.scheme import get_scheme
from fxquant.tensor_parallel import from_local_source, held_like, is_dtensor, local, local_output, split_side


def plan_merges(plan: Plan) -> None:
    """Mark the layers that will run as one GEMM: `merged_with` names the group, the note says it; a
    layer of a group that cannot join it says why in its note."""
    uses = Counter(id(entry.site.weight) for entry in plan)
    groups: dict[tuple, list[tuple[PlannedLinear, str | None]]] = {}
    for entry in plan.rewritten:
        if (
            (entry.stored is None or entry.site.weight in STORED_WEIGHTS)
            and entry.site.kind == "linear"
            and get_scheme(entry.scheme).merge_dims
            and entry.site.bias is None
            and uses[id(entry.site.weight)] == 1
        ):
            activation, reason = _local_activation(entry)
            if activation is not None:
                key = (activation, entry.scheme, entry.options, entry.stored is None)
                groups.setdefault(key, []).append((entry, reason))
    for group in (group for group in groups.values() if len(group) > 1):
        members = [entry for entry, reason in group if reason is None]
        for entry, reason in group:
            if reason is not None:
                words = f"not merged with {_short([other.layer for other, _ in group if other is not entry])}: {reason}"
            elif len(members) > 1:
                entry.merged_with = tuple(member.layer for member in members)
                words = f"one GEMM with {_short([layer for layer in entry.merged_with if layer != entry.layer])}"
            else:
                continue
            entry.note = "; ".join(filter(None, [entry.note, words]))


def _short(layers: list[str]) -> str:
    return ", ".join(layer.rsplit(".", 1)[-1] for layer in layers)


def _local_activation(entry: PlannedLinear) -> tuple[fx.Node | None, str | None]:
    """The activation the layer's op would take in a merged GEMM, and why it cannot join one (None: it
    can); (None, None) where it is not merged at all. A plain weight's op, or a `.to_local()` weight's,
    takes its activation as it is. An op on a DTensor weight is a column-wise layer of
    parallelize_module: it takes the plain tensor its input hook made the DTensor from, if its output is
    read only through `.to_local()`; stacking DTensors would concatenate the global weights instead."""
    site = entry.site
    if not is_dtensor(site.weight) or site.reads_local_part:
        return site.activation, None
    source = from_local_source(site.activation)
    if split_side(site.weight, site.weight_is_kn) != "N" or source is None:
        return None, None  # row-wise: partial sums, reduced by the layer's own hook
    activation, reason = source
    if reason is None and local_output(site.node) is None:
        reason = "its output is read as a DTensor, not only through .to_local() (use_local_output=False)"
    if reason is None and entry.stored is not None:
        reason = "stored DTensor weights are not stacked"
    return activation, reason


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
    """The parts concatenated along `dim`: a view of their storage where they already lie in it one
    after another (stacked for another graph of the same model), else a new tensor."""
    first, offset = parts[0], parts[0].storage_offset()
    for part in parts:
        if (dim != 0 or not part.is_contiguous() or part.storage_offset() != offset
                or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return torch.cat(parts, dim)
        offset += part.numel()
    shape = (sum(part.shape[0] for part in parts), *first.shape[1:])
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)


def _member_tensors(member: PlannedLinear) -> dict[str, Tensor]:
    """A member's tensors in the op's layout: its quantized copy's, or the stored ones its module holds."""
    if member.stored is None:
        return {name: local(t) for name, t in member.quantized.tensors.items()}  # DTensors: read by .to_local()
    stored, site = STORED_WEIGHTS[member.site.weight], member.site
    n, k = site.out_features, site.in_features
    others = {name: op_tensor(member.scheme, name, t, n, k, member.options) for name, t in stored.tensors().items()}
    return {"weight": site.weight.detach(), **others}


def hold_stored_in_stacks(plan: Plan) -> None:
    """Move the module tensors of each merged stored layer into its views of the stacked buffers (their
    `.data`: same objects and values), so that each is held once. Called once the graph is compiled:
    the compile reads them as the trace saw them."""
    for member in plan.rewritten:
        if member.stacked_views is None:
            continue
        stored = STORED_WEIGHTS[member.site.weight]
        module = stored.module()
        for name, view in member.stacked_views.items():
            held = getattr(module, stored.attribute(name))
            held.data = view.reshape(held.shape)
        member.stacked_views = None


def _merge(gm: fx.GraphModule, members: list[PlannedLinear]) -> None:
    graph = gm.graph
    position = {node: i for i, node in enumerate(graph.nodes)}
    members = sorted(members, key=lambda m: position[m.fused])
    tensors = [_member_tensors(m) for m in members]
    dims = get_scheme(members[0].scheme).merge_dims
    first = members[0]
    named = first.quantized.attrs["weight"].removesuffix("_weight") if first.stored is None else "fxquant_" + re.sub(r"\W", "_", first.layer)
    prefix = named + "_merged"
    stacked = {}
    for name, dim in dims.items():
        stacked[name] = _stacked([t[name] for t in tensors], dim)
        gm.register_buffer(prefix + buffer_suffix(name), stacked[name])
    views = {name: stacked[name].split([t[name].shape[dim] for t in tensors], dim) for name, dim in dims.items()}
    widths = [t["weight"].shape[dims["weight"]] for t in tensors]
    for i, member in enumerate(members):
        held = {name: views[name][i] for name in dims}
        if member.stored is None:  # a DTensor copy stays one, around its view (another graph may run it so)
            member.quantized.hold_in({name: held_like(view, member.quantized.tensors[name]) for name, view in held.items()})
        else:
            member.stacked_views = held

    x, _ = _local_ends(first)
    olds = [_local_ends(member)[1] for member in members]
    with graph.inserting_before(first.fused):
        call = first.call.with_tensors({name: buffer_node(gm, prefix + buffer_suffix(name), x) for name in dims})
        call = dataclasses.replace(call, args={**call.args, call.activation: x})
        merged = graph.call_function(call.op, call.node_args())
        parts = graph.call_function(torch.ops.aten.split_with_sizes.default, (merged, widths, -1))
        outputs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    _set_fake_values(merged, parts, olds)
    for member, old, output in zip(members, olds, outputs):
        buffers = [member.call.tensor(name) for name in member.call.tensors]
        activation = member.call.args[member.call.activation]
        output.meta.update(old.meta)
        old.replace_all_uses_with(output)
        _erase_unused(graph, old, stop=member.fused)  # parallelize_module's .to_local() and redistribute
        graph.erase_node(member.fused)
        for buffer in buffers:
            if isinstance(buffer, fx.Node) and not buffer.users and buffer.op != "placeholder":
                graph.erase_node(buffer)  # a buffer of gm, or the reshape of a stored tensor
                if buffer.op == "get_attr":
                    delattr(gm, buffer.target)
        _erase_unused(graph, activation, stop=x)  # parallelize_module's from_local, where nothing else reads it
        member.fused, member.call = merged, call
    counters["fxquant"]["merged_linears"] += len(members)


def _local_ends(member: PlannedLinear) -> tuple[fx.Node, fx.Node]:
    """(the activation the merged op takes, the node whose uses the member's part of its output
    takes over): the op's own for a plain or `.to_local()` weight; for an op on DTensors, the tensor its
    input was made from and the `.to_local()` of its output (both checked by `plan_merges`)."""
    activation = member.call.args[member.call.activation]
    if not is_dtensor(member.site.weight) or member.site.reads_local_part:
        return activation, member.fused
    return from_local_source(activation)[0], local_output(member.fused)


def _erase_unused(graph: fx.Graph, node: fx.Node, stop: fx.Node) -> None:
    """Erase `node` and, up through first arguments, each node nothing else uses, stopping at `stop`."""
    while node is not stop and not node.users:
        source = node.args[0]
        graph.erase_node(node)
        node = source


def _set_fake_values(merged: fx.Node, parts: fx.Node, olds: list[fx.Node]) -> None:
    """The merged op's fake output: the members' outputs concatenated along N."""
    values = [fake_value(old) for old in olds]
    if any(v is None for v in values):
        return
    key = "val" if "val" in olds[0].meta else "example_value"
    with values[0].fake_mode:
        merged.meta[key] = torch.cat(values, dim=-1)
    parts.meta[key] = tuple(values)
