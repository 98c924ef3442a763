"""Find the linear layers of a graph: matmuls whose right operand is a 2-D parameter.

Matches (torch level and aten level alike), with W a parameter of shape [N, K]:
    linear(x, W, b)        F.linear / aten.linear
    matmul(x, W.t())       x @ W.t(), x @ W.T, torch.matmul, aten.matmul, mm, aten.mm
    addmm(b, x, W.t())     torch.addmm / aten.addmm with beta = alpha = 1 and b of shape [N]
and `x @ V` with V a parameter of shape [K, N] (stored transposed). Produces LinearSite records;
it changes nothing.
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


@dataclass
class LinearSite:
    """One matched linear layer: `node` computes activation @ weight.T (+ bias).

    The activation and bias are read from `node` when asked for, so they stay right while
    earlier sites are rewritten.
    """

    node: fx.Node
    kind: str  # "linear", "matmul" or "addmm"
    weight_name: str  # the parameter's qualified name, e.g. "layers.0.mlp.up_proj.weight"
    weight: torch.Tensor  # the parameter itself
    weight_is_kn: bool  # True when the parameter is stored [K, N] (x @ V), not [N, K]
    view_node: fx.Node | None  # the transpose between the parameter and the matmul, if any

    @property
    def activation(self) -> fx.Node:
        return self.node.args[1] if self.kind == "addmm" else self.node.args[0]

    @property
    def weight_node(self) -> fx.Node:
        """The node that holds the parameter (before any transpose)."""
        if self.view_node is not None:
            return self.view_node.args[0]
        if self.kind == "linear":
            return self.node.args[1] if len(self.node.args) > 1 else self.node.kwargs["weight"]
        return self.node.args[-1]

    @property
    def bias(self) -> fx.Node | None:
        if self.kind == "addmm":
            return self.node.args[0]
        if self.kind == "linear":
            return self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("bias")
        return None

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.weight_is_kn else self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[0] if self.weight_is_kn else self.weight.shape[1]


def fake_value(node: object) -> torch.Tensor | None:
    """The fake tensor a node carries (`val` at aten level, `example_value` under Dynamo)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def _swaps_dims(dims: tuple) -> bool:
    """transpose(a, b) on a 2-D tensor: two dims, one 0 and one 1 (negative dims allowed)."""
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and dims[0] % 2 != dims[1] % 2


def _reverses_dims(dims: tuple) -> bool:
    """permute(1, 0) or permute([1, 0]) on a 2-D tensor."""
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and [d % 2 for d in dims] == [1, 0]


def _is_transpose_2d(node: fx.Node) -> bool:
    """W.t(), W.T, W.transpose(0, 1), W.permute(1, 0) and their aten forms."""
    args = node.args[1:]
    if node.op == "call_method":
        return node.target == "t" or (node.target == "transpose" and _swaps_dims(args)) or (
            node.target == "permute" and _reverses_dims(args)
        )
    if node.op != "call_function":
        return False
    if node.target in (torch.t, aten.t.default, aten.numpy_T.default) or (node.target is getattr and args == ("T",)):
        return True
    if node.target in (torch.transpose, aten.transpose.int):
        return _swaps_dims(args)
    return node.target in (torch.permute, aten.permute.default) and _reverses_dims(args)


def _parameter(node: object, lookup: WeightLookup) -> tuple[str, torch.Tensor] | None:
    if not isinstance(node, fx.Node):
        return None
    found = lookup(node)
    if found is None or found[1].dim() != 2:
        return None
    return found


def _right_operand(operand: object, lookup: WeightLookup) -> tuple[str, torch.Tensor, bool, fx.Node | None] | None:
    """For a matmul's right operand: (parameter name, parameter, stored [K, N]?, transpose node)."""
    if not isinstance(operand, fx.Node):
        return None
    if _is_transpose_2d(operand):
        found = _parameter(operand.args[0], lookup)
        return None if found is None else (*found, False, operand)
    found = _parameter(operand, lookup)
    return None if found is None else (*found, True, None)


def match_linear(node: fx.Node, lookup: WeightLookup) -> LinearSite | None:
    """The LinearSite `node` computes, or None."""
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        found = _parameter(weight, lookup)
        if found is None or not isinstance(node.args[0], fx.Node):
            return None
        return LinearSite(node, "linear", *found, False, None)

    is_matmul = (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS
    )
    if is_matmul and len(node.args) == 2 and not node.kwargs:
        x, right = node.args
        operand = _right_operand(right, lookup)
        if operand is None or not isinstance(x, fx.Node):
            return None
        return LinearSite(node, "matmul", *operand)

    if node.op == "call_function" and node.target in ADDMM_FUNCTIONS and len(node.args) == 3:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, right = node.args
        operand = _right_operand(right, lookup)
        bias_value = fake_value(bias)
        if operand is None or not isinstance(x, fx.Node) or bias_value is None or bias_value.dim() != 1:
            return None
        return LinearSite(node, "addmm", *operand)
    return None


def find_linears(gm: fx.GraphModule, lookup: WeightLookup) -> list[LinearSite]:
    """Every linear layer of `gm`, in graph order."""
    return [site for node in gm.graph.nodes if (site := match_linear(node, lookup)) is not None]
