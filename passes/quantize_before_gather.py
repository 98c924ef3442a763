"""Quantize before the gather: a grouped expert op whose activation is rows gathered from a tensor reads
that tensor and the row indices instead.

    x = h[rows]   (or h.index_select(0, rows))    (transformers' grouped_mm: each token once per expert it
    x.masked_fill_(mask, 0)     (mask [S, 1])      is routed to; 5.17 zeroes expert-parallel sentinel rows)
    x = x.to(dtype)                               (conversions)
    y = fp8_rowwise_grouped_mm(x, w_q, s, offsets, ub)
  →
    y = fp8_rowwise_grouped_mm(h.to(dtype), w_q, s, offsets, ub, rows).masked_fill(mask, 0)

Compiled, the tokens are then quantized in the kernel that makes them (the RMSNorm before the experts,
one row per token) and the gather moves e4m3 codes, where the gather of top-k copies of each bf16 row
was itself the quantization's producer. Exact: a row's codes and scale depend on that row alone, and
an op's output row for a zero row is zero, so zeroing rows of x is zeroing rows of y.

Matches ops whose schema has `rows` (fp8_rowwise_grouped_mm, fp8_blockwise_grouped_mm), `rows` unset,
whose activation is a chain of dtype conversions and functional zeroing masked_fills of `h[rows]` (a
1-D integer index, h 2-D) that nothing else reads; the gathered rows may also be zeroed in place
before the chain reads them. Anything else that reads or writes the gathered rows leaves the op as it is.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._dynamo.utils import counters

from fxquant.passes.find_sites import fake_value
from fxquant.passes.rewrite_linears import aten_node

CONVERSION_METHODS = {"to", "float", "half", "bfloat16"}
CONVERSION_FUNCTIONS = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.prims.convert_element_type.default}
# export's dtype checks, where torch has them: they read a tensor, nothing more
CHECKS = {op.default for op in [getattr(torch.ops.aten, "_assert_tensor_metadata", None)] if op is not None}
INDEX_SELECTS = {"index_select", torch.index_select, torch.ops.aten.index_select.default}
MASKED_FILLS = {torch.ops.aten.masked_fill.Scalar, torch.Tensor.masked_fill}


def quantize_before_gathers(gm: fx.GraphModule) -> None:
    """Give each grouped op that reads gathered rows the tensor they come from and the rows (above)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and _takes_rows(node.target) and _argument(node, "rows") is None:
            changed |= _rewrite(gm.graph, node)
    if changed:
        gm.graph.lint()
        gm.recompile()


def _takes_rows(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload) and any(a.name == "rows" for a in target._schema.arguments)


def _argument(node: fx.Node, name: str) -> object:
    names = [argument.name for argument in node.target._schema.arguments]
    position = names.index(name)
    return node.args[position] if position < len(node.args) else node.kwargs.get(name)


def _rewrite(graph: fx.Graph, op_node: fx.Node) -> bool:
    chain, gather = _chain_to_gather(op_node.args[0])
    if gather is None:
        return False
    source, rows = gather.args[0], _gather_rows(gather)
    reader = chain[-1] if chain else op_node  # what reads the gathered rows
    in_place = [user for user in _users(gather) if user is not reader]
    if not all(_zeroes_rows(user, gather) and not user.users and _before(user, reader) for user in in_place):
        return False
    masks = [*(_row_mask(node) for node in in_place), *(_mask(node) for node in chain if _mask(node) is not None)]
    with graph.inserting_before(op_node):
        x = source
        for node in reversed(chain):  # the conversions, applied to the tokens instead
            dtype = fake_value(node).dtype
            if _mask(node) is None and dtype != fake_value(x).dtype:
                x = aten_node(graph, torch.ops.prims.convert_element_type.default, (x, dtype), node)
        new = graph.call_function(op_node.target, (x, *op_node.args[1:]), {**op_node.kwargs, "rows": rows})
        new.meta.update(op_node.meta)
        output = new
        for mask in masks:
            output = aten_node(graph, torch.ops.aten.masked_fill.Scalar, (output, mask, 0.0), op_node)
    op_node.replace_all_uses_with(output)
    graph.erase_node(op_node)
    for node in [*chain, *in_place, gather]:
        for check in [user for user in node.users if user.target in CHECKS]:
            graph.erase_node(check)
        if not node.users:
            graph.erase_node(node)
    counters["fxquant"]["quantized_before_gather"] += 1
    return True


def _chain_to_gather(x: object) -> tuple[list[fx.Node], fx.Node | None]:
    """The conversions and zeroing masked_fills from the op's activation back to a gather of rows
    (nearest the op first), each read by the next alone, and the gather; (_, None) where there is none."""
    chain = []
    while isinstance(x, fx.Node) and (_converts(x) or _mask(x) is not None) and len(_users(x)) == 1:
        chain.append(x)
        x = x.args[0]
    if not isinstance(x, fx.Node) or _gather_rows(x) is None:
        return chain, None
    source = fake_value(x.args[0])
    return chain, x if isinstance(source, torch.Tensor) and source.dim() == 2 else None


def _users(node: fx.Node) -> list[fx.Node]:
    """What reads `node`, export's dtype checks aside."""
    return [user for user in node.users if user.target not in CHECKS]


def _gather_rows(node: fx.Node) -> fx.Node | None:
    """The rows of `h[rows]` (operator.getitem, aten.index.Tensor) or of `h.index_select(0, rows)` (the
    method, torch's function, aten's op), h the first argument, a 1-D integer tensor node; else None."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    if node.target is operator.getitem and len(node.args) == 2:
        rows = node.args[1]
    elif node.target is torch.ops.aten.index.Tensor and len(node.args) == 2 and len(node.args[1]) == 1:
        rows = node.args[1][0]
    elif node.target in INDEX_SELECTS:
        arguments = {**dict(zip(("dim", "index"), node.args[1:])), **node.kwargs}
        if set(arguments) != {"dim", "index"} or arguments["dim"] != 0:
            return None
        rows = arguments["index"]
    else:
        return None
    value = fake_value(rows) if isinstance(rows, fx.Node) else None
    indexes = isinstance(value, torch.Tensor) and value.dim() == 1 and not value.is_floating_point()
    return rows if indexes and value.dtype != torch.bool else None


def _converts(node: fx.Node) -> bool:
    """A dtype conversion of one tensor (`.to(dtype)`, `.float()`, aten.to.dtype, aten._to_copy(dtype=...), prims' convert)."""
    if node.op == "call_method" and node.target in CONVERSION_METHODS:
        extra = [*node.args[1:], *node.kwargs.values()]
        return all(isinstance(a, torch.dtype) for a in extra) and set(node.kwargs) <= {"dtype"}
    if node.op == "call_function" and node.target in CONVERSION_FUNCTIONS:
        return set(node.kwargs) <= {"dtype"}
    return False


def _mask(node: fx.Node) -> fx.Node | None:
    """The [S, 1] mask of a functional `x.masked_fill(mask, 0)` of whole rows; else None."""
    if not (node.op in ("call_function", "call_method") and node.target in (*MASKED_FILLS, "masked_fill")):
        return None
    return _row_mask(node)


def _zeroes_rows(node: fx.Node, gathered: fx.Node) -> bool:
    """`gathered.masked_fill_(mask, 0)` in place, of whole rows."""
    in_place = (node.op == "call_method" and node.target == "masked_fill_") or (
        node.op == "call_function" and node.target in (torch.ops.aten.masked_fill_.Scalar, torch.Tensor.masked_fill_))
    return in_place and node.args[0] is gathered and _row_mask(node) is not None


def _row_mask(node: fx.Node) -> fx.Node | None:
    """The mask of `x.masked_fill(mask, 0)` (in place or not) where it is a bool [S, 1]: whole rows of x."""
    arguments = {**dict(zip(("mask", "value"), node.args[1:])), **node.kwargs}
    mask_node = arguments.get("mask")
    if set(arguments) != {"mask", "value"} or not isinstance(mask_node, fx.Node) or arguments["value"] != 0:
        return None
    x, mask = fake_value(node.args[0]), fake_value(mask_node)
    whole_rows = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == (x.shape[0], 1)
    return mask_node if whole_rows else None


def _before(node: fx.Node, later: fx.Node) -> bool:
    for current in node.graph.nodes:
        if current is node:
            return True
        if current is later:
            return False
    return False
