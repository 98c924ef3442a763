"""Find the GEMM sites of a graph: matmuls whose right operand is a parameter, in one vocabulary.

Each spelling of a matmul is read into a GemmSite of one of three kinds; with W a parameter:
    linear    x [..., K] times a 2-D W [N, K]:
                  linear(x, W, b)          F.linear / aten.linear (args or keywords)
                  matmul(x, W.t())         x @ W.t(), x @ W.T, torch.matmul, mm and their aten forms
                  addmm(b, x, W.t())       beta = alpha = 1, b of shape [N]
              and x @ V with V stored [K, N] (`weight_is_kn`)
    batched   row s of x [S, K] times expert W[ids[s]] of W [E, N, K] (transformers' `batched_mm`):
                  bmm(W[ids], x.unsqueeze(-1))     or   bmm(x.unsqueeze(1), V[ids]) with V [E, K, N]
    grouped   rows of x [S, K] grouped by expert, group g ending at offsets[g] (transformers' `grouped_mm`):
                  _grouped_mm(x, W.transpose(-2, -1), offs=offsets)   or   _grouped_mm(x, V, offs=offsets)
              (no bias, out_dtype None or x's)
              (torch._grouped_mm, F.grouped_mm, aten._grouped_mm, transformers' grouped_mm_fallback)
The weight operand's views are read the same way everywhere: t(), .T, .mT, transpose / swapaxes of
the last two dims, a permute that swaps them. The graph is not rewritten into this vocabulary: the
sites are a reading of it, so that layers the plan skips stay exactly as traced. Produces GemmSite
records; it changes nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

# node → (parameter's qualified name, the parameter) when the node holds a parameter, else None.
WeightLookup = Callable[[fx.Node], "tuple[str, torch.Tensor] | None"]

LINEAR_FUNCTIONS = {torch._C._nn.linear, F.linear, aten.linear.default}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.mm, aten.matmul.default, aten.mm.default}
MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}
BMM_FUNCTIONS = {torch.bmm, aten.bmm.default}
BMM_METHODS = {"bmm"}
GROUPED_FUNCTIONS = {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None}
GROUPED_OPS = {"aten::_grouped_mm", "transformers::grouped_mm_fallback"}  # by name: transformers' op may not exist
GATHER_FUNCTIONS = {operator.getitem, aten.index.Tensor}
SITE_KINDS = ("linear", "batched", "grouped")


@dataclass
class GemmSite:
    """One matched GEMM: `node` computes the activation times the weight (+ bias).

    The activation, bias and the kind's extra operands are read from the graph when asked for, so
    they stay right while earlier sites are rewritten.
    """

    node: fx.Node
    kind: str  # "linear", "batched" or "grouped" (SITE_KINDS)
    op: str  # the spelling it was read from: "linear", "matmul", "addmm", "bmm", "grouped_mm"
    weight_name: str  # the parameter's qualified name, e.g. "layers.0.mlp.up_proj.weight"
    weight: torch.Tensor  # the parameter itself: [N, K], or [E, N, K] for experts
    weight_is_kn: bool  # True when the parameter is stored with K before N ([K, N], [E, K, N])
    view_node: fx.Node | None  # the transpose between the parameter (or its gather) and the matmul, if any
    gather_node: fx.Node | None = None  # batched: the parameter indexed by expert ids, W[ids]

    @property
    def activation(self) -> fx.Node:
        """The activation operand as the matmul takes it ([S, K, 1] or [S, 1, K] for bmm)."""
        if self.op == "addmm":
            return self.node.args[1]
        if self.op == "bmm":
            return self.node.args[1] if self.unit_dim == 2 else self.node.args[0]
        if self.op == "matmul":
            return _matmul_operands(self.node)[0]
        return self.node.args[0] if self.node.args else self.node.kwargs["input"]

    @property
    def unit_dim(self) -> int | None:
        """batched: the dim of size 1 of bmm's activation and output (2: W[ids] @ x [S, K, 1]; 1: x [S, 1, K] @ V[ids])."""
        if self.op != "bmm":
            return None
        return 2 if self.node.args[0] in (self.view_node, self.gather_node) else 1

    @property
    def reads_local_part(self) -> bool:
        """The weight is a DTensor read through `.to_local()` (transformers' tensor-parallel layers):
        the op takes the local parts of its quantized tensors."""
        weight_value = fake_value(self.weight_node)
        return hasattr(self.weight, "placements") and weight_value is not None and not hasattr(weight_value, "placements")

    @property
    def weight_node(self) -> fx.Node:
        """The node that holds the parameter (before any gather or transpose)."""
        if self.gather_node is not None:
            return self.gather_node.args[0]
        if self.view_node is not None:
            return self.view_node.args[0]
        if self.op == "linear":
            return self.node.args[1] if len(self.node.args) > 1 else self.node.kwargs["weight"]
        if self.op == "matmul":
            return _matmul_operands(self.node)[1]
        return self.node.args[-1] if self.op == "addmm" else self.node.args[1]

    @property
    def bias(self) -> fx.Node | None:
        if self.op == "addmm":
            return self.node.args[0]
        if self.op == "linear":
            return self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("bias")
        return None

    @property
    def offsets(self) -> fx.Node | None:
        """grouped: the int32 [E] end row of each expert's group."""
        if self.kind != "grouped":
            return None
        return self.node.kwargs["offs"] if "offs" in self.node.kwargs else self.node.args[2]  # bias, out_dtype: None

    @property
    def expert_ids(self) -> fx.Node | None:
        """batched: the [S] expert of each row."""
        if self.gather_node is None:
            return None
        index = self.gather_node.args[1]
        return index[0] if isinstance(index, (list, tuple)) else index

    @property
    def experts(self) -> int | None:
        """E, the number of experts of a batched or grouped site's weight; None for linear."""
        return None if self.kind == "linear" else self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-1] if self.weight_is_kn else self.weight.shape[-2]

    @property
    def in_features(self) -> int:
        return self.weight.shape[-2] if self.weight_is_kn else self.weight.shape[-1]


def fake_value(node: object) -> torch.Tensor | None:
    """The fake tensor a node carries (`val` at aten level, `example_value` under Dynamo)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def _op_name(target: object) -> str | None:
    """"namespace::name" of an op overload or packet, else None."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return None


def _swaps_last_two(dims: tuple, ndim: int) -> bool:
    """transpose(a, b) / swapaxes(a, b): a and b are the last two dims of an `ndim`-D tensor."""
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and sorted(d % ndim for d in dims) == [ndim - 2, ndim - 1]


def _permutes_last_two(dims: tuple, ndim: int) -> bool:
    """permute(..., n-1, n-2), given as separate dims or one list: the last two dims swapped, the rest kept."""
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
        return False
    return [d % ndim for d in dims] == [*range(ndim - 2), ndim - 1, ndim - 2]


def swaps_last_two_dims(node: fx.Node, ndim: int) -> bool:
    """Whether `node` is a transpose of the last two dims of its `ndim`-D input: W.t(), W.T, W.mT,
    W.transpose(-2, -1), swapaxes, permute, in torch and aten spellings."""
    args = node.args[1:]
    if node.op == "call_method":
        return (
            (node.target == "t" and ndim == 2)
            or (node.target in ("transpose", "swapaxes", "swapdims") and _swaps_last_two(args, ndim))
            or (node.target == "permute" and _permutes_last_two(args, ndim))
        )
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return (args == ("T",) and ndim == 2) or args == ("mT",)
    if node.target in (torch.t, aten.t.default, aten.numpy_T.default):
        return ndim == 2
    if node.target is aten.mT.default:
        return True
    if node.target in (torch.transpose, torch.swapaxes, torch.swapdims, aten.transpose.int, aten.swapaxes.default, aten.swapdims.default):
        return _swaps_last_two(args, ndim)
    return node.target in (torch.permute, aten.permute.default) and _permutes_last_two(args, ndim)


@dataclass
class WeightOperand:
    """A matmul's right operand read as a parameter: the parameter, its layout and the views on the way."""

    name: str
    weight: torch.Tensor
    is_kn: bool  # the operand is the parameter as stored (K before N); False: a transpose of it
    view_node: fx.Node | None
    gather_node: fx.Node | None


def _parameter(node: object, lookup: WeightLookup, ndim: int) -> tuple[str, torch.Tensor] | None:
    if not isinstance(node, fx.Node):
        return None
    found = lookup(node)
    return found if found is not None and found[1].dim() == ndim else None


def _gathered(node: object, lookup: WeightLookup) -> tuple[tuple[str, torch.Tensor], fx.Node] | None:
    """W[ids] (getitem / aten.index with one index tensor) of a 3-D parameter W: (W, the gather)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in GATHER_FUNCTIONS):
        return None
    index = node.args[1]
    if isinstance(index, (list, tuple)):
        if len(index) != 1:
            return None
        index = index[0]
    ids = fake_value(index)
    if ids is None or ids.dim() != 1 or ids.dtype in (torch.bool, torch.uint8) or ids.is_floating_point():
        return None
    found = _parameter(node.args[0], lookup, 3)
    return None if found is None else (found, node)


def weight_operand(operand: object, lookup: WeightLookup, ndim: int, gathered: bool = False) -> WeightOperand | None:
    """`operand` read as an `ndim`-D parameter (`gathered`: its rows W[ids] of a 3-D parameter),
    transposed over its last two dims or not; None when it is something else."""
    if not isinstance(operand, fx.Node):
        return None
    view = operand if swaps_last_two_dims(operand, ndim) else None
    source = view.args[0] if view is not None else operand
    if gathered:
        found = _gathered(source, lookup)
        if found is None:
            return None
        (name, weight), gather = found
        return WeightOperand(name, weight, view is None, view, gather)
    found = _parameter(source, lookup, ndim)
    return None if found is None else WeightOperand(*found, view is None, view, None)


def _site(node: fx.Node, kind: str, op: str, operand: WeightOperand | None) -> GemmSite | None:
    if operand is None:
        return None
    return GemmSite(node, kind, op, operand.name, operand.weight, operand.is_kn, operand.view_node, operand.gather_node)


def _is_call(node: fx.Node, functions: set, methods: set = frozenset()) -> bool:
    return (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target in methods)


def _matmul_operands(node: fx.Node) -> tuple[object, object] | None:
    """(x, right) of a matmul spelled with positional or keyword arguments (input / self, other / mat2)."""
    args = [*node.args, *(node.kwargs[name] for name in ("input", "self", "other", "mat2") if name in node.kwargs)]
    return tuple(args) if len(args) == 2 == len(node.args) + len(node.kwargs) else None


def match_site(node: fx.Node, lookup: WeightLookup) -> GemmSite | None:
    """The GemmSite `node` computes, or None."""
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        x = node.args[0] if node.args else node.kwargs.get("input")
        found = _parameter(weight, lookup, 2)
        if found is None or not isinstance(x, fx.Node):
            return None
        return GemmSite(node, "linear", "linear", *found, False, None)

    if _is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS):
        operands = _matmul_operands(node)
        if operands is None or not isinstance(operands[0], fx.Node):
            return None
        operand = weight_operand(operands[1], lookup, 2)
        return None if operand is None else _site(node, "linear", "matmul", operand)

    if node.op == "call_function" and node.target in ADDMM_FUNCTIONS and len(node.args) == 3:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, right = node.args
        bias_value = fake_value(bias)
        if not isinstance(x, fx.Node) or bias_value is None or bias_value.dim() != 1:
            return None
        return _site(node, "linear", "addmm", weight_operand(right, lookup, 2))

    if _is_call(node, BMM_FUNCTIONS, BMM_METHODS) and len(node.args) == 2 and not node.kwargs:
        left, right = node.args
        right_weight = weight_operand(right, lookup, 3, gathered=True)  # bmm(x.unsqueeze(1), V[ids]) → [S, 1, N]
        if right_weight is not None and _is_row_vectors(left, 1):
            return _site(node, "batched", "bmm", right_weight)
        left_weight = weight_operand(left, lookup, 3, gathered=True)  # bmm(W[ids], x.unsqueeze(-1)) → [S, N, 1]
        if left_weight is not None and left_weight.view_node is None and _is_row_vectors(right, 2):
            left_weight.is_kn = False  # W[ids] @ x: the parameter as stored is [E, N, K]
            return _site(node, "batched", "bmm", left_weight)
        return None

    if (node.op == "call_function" and node.target in GROUPED_FUNCTIONS) or _op_name(node.target) in GROUPED_OPS:
        options = {**dict(zip(("offs", "bias", "out_dtype"), node.args[2:])), **node.kwargs}
        x = fake_value(node.args[0]) if len(node.args) >= 2 else None
        if (x is None or x.dim() != 2 or options.get("offs") is None or options.get("bias") is not None
                or options.get("out_dtype") not in (None, x.dtype) or set(options) - {"offs", "bias", "out_dtype"}):
            return None
        return _site(node, "grouped", "grouped_mm", weight_operand(node.args[1], lookup, 3))
    return None


def _is_row_vectors(node: object, unit_dim: int) -> bool:
    """An [S, 1, K] (`unit_dim` 1) or [S, K, 1] (`unit_dim` 2) activation for bmm."""
    value = fake_value(node)
    return value is not None and value.dim() == 3 and value.shape[unit_dim] == 1


def find_sites(gm: fx.GraphModule, lookup: WeightLookup) -> list[GemmSite]:
    """Every GEMM site of `gm`, in graph order."""
    return [site for node in gm.graph.nodes if (site := match_site(node, lookup)) is not None]
