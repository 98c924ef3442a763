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
    indexed   x [..., K] times expert e of W [E, N, K], e an int or a 0-d integer tensor (a loop over
              experts, transformers' `eager`): every linear spelling on W[e] (select / index):
                  linear(x, W[e], b)       matmul(x, W[e].t())       matmul(x, V[e]) with V [E, K, N]
The weight operand's views are read the same way everywhere: t(), .T, .mT, transpose / swapaxes of
the last two dims, a permute that swaps them; so are conversions of the parameter to a float dtype
(`W.float()`, `W.to(dtype)`, `W.type(dtype)`: DeepSeek-V3's router; `fxquant::stored_weight`:
a stored weight as its module presents it to a trace). The graph is not rewritten into this vocabulary: the
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
SELECT_FUNCTIONS = {aten.select.int}  # select(W, 0, e)
CONVERT_FUNCTIONS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}
CONVERT_METHODS = {"to", "type", "float", "half", "bfloat16", "double"}
CONVERT_OPS = {"fxquant::stored_weight"}  # a stored weight as its module presents it (passes/stored_weights.py)
SITE_KINDS = ("linear", "batched", "grouped", "indexed")


@dataclass
class GemmSite:
    """One matched GEMM: `node` computes the activation times the weight (+ bias).

    The activation, bias and the kind's extra operands are read from the graph when asked for, so
    they stay right while earlier sites are rewritten.
    """

    node: fx.Node
    kind: str  # "linear", "batched", "grouped" or "indexed" (SITE_KINDS)
    op: str  # the spelling it was read from: "linear", "matmul", "addmm", "bmm", "grouped_mm"
    weight_name: str  # the parameter's qualified name, e.g. "layers.0.mlp.up_proj.weight"
    weight: torch.Tensor  # the parameter itself: [N, K], or [E, N, K] for experts
    weight_is_kn: bool  # True when the parameter is stored with K before N ([K, N], [E, K, N])
    view_node: fx.Node | None  # the transpose between the parameter (or its gather) and the matmul, if any
    gather_node: fx.Node | None = None  # batched: the parameter indexed by expert ids, W[ids]; indexed: W[e]
    convert_nodes: tuple[fx.Node, ...] = ()  # float conversions of the parameter on the way (W.float())
    parameter_node: fx.Node | None = None  # the node holding the parameter (None: read it from the matmul)

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
        """The node that holds the parameter (before any conversion, gather or transpose)."""
        if self.parameter_node is not None:
            return self.parameter_node
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
        if self.gather_node is None or self.kind != "batched":
            return None
        index = self.gather_node.args[1]
        return index[0] if isinstance(index, (list, tuple)) else index

    @property
    def expert_index(self) -> fx.Node | int | None:
        """indexed: the expert e of W[e] (an int, a SymInt node or a 0-d integer tensor node)."""
        if self.kind != "indexed":
            return None
        return selected_index(self.gather_node)

    @property
    def experts(self) -> int | None:
        """E, the number of experts of an expert site's weight; None for linear."""
        return None if self.kind == "linear" else self.weight.shape[0]

    @property
    def operand_dtype(self) -> torch.dtype:
        """The weight's dtype as the matmul takes it (after a conversion of the parameter, if any)."""
        converted = fake_value(self.convert_nodes[0]) if self.convert_nodes else None
        return self.weight.dtype if converted is None else converted.dtype

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
    convert_nodes: tuple[fx.Node, ...] = ()
    selected: bool = False  # the operand is one expert W[e] of a 3-D parameter
    parameter_node: fx.Node | None = None


def _converted(node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """(the tensor `node` converts, the conversions) through float-dtype conversions (W.float(),
    W.to(torch.bfloat16), W.type(torch.float32), aten._to_copy); (node, ()) when it is none."""
    conversions = []
    while isinstance(node, fx.Node) and _is_float_conversion(node):
        conversions.append(node)
        node = node.args[0]
    return node, tuple(conversions)


def _is_float_conversion(node: fx.Node) -> bool:
    if not ((node.op == "call_function" and (node.target in CONVERT_FUNCTIONS or _op_name(node.target) in CONVERT_OPS))
            or (node.op == "call_method" and node.target in CONVERT_METHODS)):
        return False
    value, source = fake_value(node), fake_value(node.args[0]) if node.args else None
    return (value is not None and source is not None and value.is_floating_point()
            and value.shape == source.shape and value.device == source.device)


def _parameter(node: object, lookup: WeightLookup, ndim: int) -> tuple[str, torch.Tensor, tuple[fx.Node, ...], fx.Node] | None:
    """(name, parameter, the float conversions on the way, its node) of an `ndim`-D parameter, or None."""
    if not isinstance(node, fx.Node):
        return None
    node, conversions = _converted(node)
    found = lookup(node) if isinstance(node, fx.Node) else None
    return (*found, conversions, node) if found is not None and found[1].dim() == ndim else None


def selected_index(node: fx.Node) -> object:
    """e of a selection W[e]: getitem(W, e), select(W, 0, e) or index(W, [e])."""
    if node.target in SELECT_FUNCTIONS:
        return node.args[2]
    index = node.args[1]
    return index[0] if isinstance(index, (list, tuple)) else index


def _is_expert_index(index: object, ids: bool) -> bool:
    """`ids`: a 1-D integer tensor (W[ids], a gather); else one expert: an int, a SymInt or a 0-d integer tensor."""
    if isinstance(index, int) and not isinstance(index, bool):
        return not ids
    value = fake_value(index) if isinstance(index, fx.Node) else None
    if value is None:
        symbolic = isinstance(index, fx.Node) and isinstance(index.meta.get("val", index.meta.get("example_value")), torch.SymInt)
        return symbolic and not ids
    integer = value.dtype not in (torch.bool, torch.uint8) and not value.is_floating_point()
    return integer and value.dim() == (1 if ids else 0)


def _gathered(node: object, lookup: WeightLookup, ids: bool = True) -> tuple[tuple, fx.Node, fx.Node | None] | None:
    """W[ids] (getitem / aten.index with one index tensor) of a 3-D parameter W, or with `ids` False
    one expert W[e] (also select(W, 0, e)), also of W transposed over its last two dims:
    ((name, W, conversions, W's node), the gather, the transpose under it or None)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    if node.target in SELECT_FUNCTIONS:
        if ids or node.args[1] != 0:
            return None
    elif node.target in GATHER_FUNCTIONS:
        index = node.args[1]
        if isinstance(index, (list, tuple)):
            if len(index) != 1:
                return None
            index = index[0]
    else:
        return None
    if not _is_expert_index(selected_index(node), ids):
        return None
    base, conversions = _converted(node.args[0])
    view = base if isinstance(base, fx.Node) and swaps_last_two_dims(base, 3) else None  # W.mT[ids]: the same experts, transposed
    found = _parameter(view.args[0] if view is not None else base, lookup, 3)
    if found is None:
        return None
    name, weight, below, parameter = found
    return (name, weight, (*conversions, *below), parameter), node, view


def weight_operand(operand: object, lookup: WeightLookup, ndim: int, gathered: bool = False) -> WeightOperand | None:
    """`operand` read as an `ndim`-D parameter (`gathered`: its rows W[ids] of a 3-D parameter; for
    ndim 2 also one expert W[e] of a 3-D parameter), transposed over its last two dims or not, through
    float conversions; None when it is something else."""
    if not isinstance(operand, fx.Node):
        return None
    operand, outer = _converted(operand)
    view = operand if swaps_last_two_dims(operand, ndim) else None
    source, inner = _converted(view.args[0]) if view is not None else (operand, ())
    if gathered or ndim == 2:
        found = _gathered(source, lookup, ids=gathered)
        if found is not None:
            (name, weight, conversions, node), gather, view_below = found
            if view is not None and view_below is not None:
                return None
            view = view or view_below
            return WeightOperand(name, weight, view is None, view, gather, (*outer, *inner, *conversions), not gathered, node)
        if gathered:
            return None
    found = _parameter(source, lookup, ndim)
    if found is None:
        return None
    name, weight, conversions, node = found
    return WeightOperand(name, weight, view is None, view, None, (*outer, *inner, *conversions), parameter_node=node)


def _site(node: fx.Node, kind: str, op: str, operand: WeightOperand | None) -> GemmSite | None:
    if operand is None:
        return None
    kind = "indexed" if operand.selected else kind
    return GemmSite(node, kind, op, operand.name, operand.weight, operand.is_kn, operand.view_node, operand.gather_node,
                    operand.convert_nodes, operand.parameter_node)


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
        operand = weight_operand(weight, lookup, 2)
        if operand is None or operand.view_node is not None or not isinstance(x, fx.Node):
            return None
        operand.is_kn = False  # linear(x, W): W is [N, K]
        return _site(node, "linear", "linear", operand)

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
