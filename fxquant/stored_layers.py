"""Layers whose weights are stored quantized, run eagerly with the numerics the backend compiles.

    make_stored(model.up, "fp8_rowwise", options)   # options: the scheme's Options the weights were made with
    model.up(x)                       # eager: the scheme's op, e.g. fxquant.fp8_rowwise_linear(x, w_q, scale, bias, ub)
    torch.compile(model, backend="fxquant")(x)   # traced as F.linear(x, w_q, bias).to(x.dtype): passes/stored_weights.py

`make_stored` registers the module's weight as stored (passes/stored_weights.py) and swaps the
module's class for a subclass of it (`StoredLinear` for nn.Linear, `StoredConv1D` for
transformers' Conv1D), so `isinstance(module, nn.Linear)`, the state dict's keys and the
module's attributes stay. The weight is held [N, K], as the op takes it, for Conv1D too. While
Dynamo or torch.export traces, the forward is an `F.linear`, which fxquant's backend and
`fxquant.export` rewrite into the same op (their plan lists the layer, and the compile's config
may set its own activation_scale_ub). Dynamo sees the weight presented as a float tensor of x's
dtype (`fxquant::stored_weight`, passes/stored_weights.py), which only fxquant's rewrite removes:
another backend stops with an error that says so instead of failing inside aten. A tensor-parallel
layer's DTensor weight is traced as it is (the op has no DTensor sharding rule). A weight
whose codes are packed along K (nf4, fp4: [N, K / 2] bytes) cannot be an F.linear operand: traced,
it runs its scheme's op as eagerly, which every backend compiles (the plan does not list it).
"""

from __future__ import annotations

import functools
import logging
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxquant.log import log_once
from fxquant.passes.stored_weights import PLAIN_FLOATS, STORED_WEIGHTS, guard_stored_tensors, op_tensor, register_stored_weight
from fxquant.scheme import get_scheme
from fxquant.tensor_parallel import is_dtensor


class StoredLayer:
    """The forward of a linear layer whose `weight` [N, K] is stored quantized (mixed into its class)."""

    weight: Tensor
    bias: Tensor | None

    def forward(self, x: Tensor) -> Tensor:
        packed = self.weight.shape[-1] != x.shape[-1]  # codes packed along K (nf4, fp4): traced as their op
        if torch.compiler.is_exporting() and not packed:
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling() and not packed:
            guard_stored_tensors(self)
            if is_dtensor(self.weight):  # a tensor-parallel layer: Dynamo gives F.linear the weight's dtype
                return F.linear(x, self.weight, self.bias).to(x.dtype)
            return F.linear(x, torch.ops.fxquant.stored_weight(self.weight, x.dtype), self.bias)
        stored = STORED_WEIGHTS.get(self.weight)
        if stored is None or stored.scheme is None:
            if self.weight.dtype not in PLAIN_FLOATS:
                raise RuntimeError(
                    f"fxquant: a {type(self).__name__}'s {self.weight.dtype} weight is not registered as stored "
                    "(replaced after loading?); load the checkpoint again or call fxquant.stored_layers.make_stored"
                )
            return F.linear(x, self.weight, self.bias)  # a float weight assigned since: it runs as float
        scheme, n, k = get_scheme(stored.scheme), *self.weight.shape
        tensors = {name: op_tensor(stored.scheme, name, t, n, k, stored.options) for name, t in stored.tensors().items()}
        call = scheme.call("", x, {"weight": self.weight, **tensors}, self.bias, stored.options)
        return call.op(*call.node_args())

    def extra_repr(self) -> str:
        stored = STORED_WEIGHTS.get(self.weight)
        scheme = f"stored {stored.scheme}" if stored is not None and stored.scheme else "stored"
        return ", ".join(filter(None, (super().extra_repr(), scheme)))


class CompiledOnlyLayer:
    """The forward of a subclass of nn.Linear with a forward of its own (Falcon's FalconLinear: `x @
    weight.T`) whose weight is stored quantized: traced, its own forward, whose matmul fxquant's
    backend and export rewrite into the scheme's op; eagerly, an error naming the layer, since that
    forward would multiply the codes themselves."""

    weight: Tensor
    stored_layer: str

    def forward(self, *args, **kwargs):
        stored = STORED_WEIGHTS.get(self.weight)
        if torch.compiler.is_compiling():
            guard_stored_tensors(self)
            return super().forward(*args, **kwargs)
        if stored is None or stored.scheme is None:  # a float weight assigned since
            return super().forward(*args, **kwargs)
        raise RuntimeError(
            f"fxquant: layer '{self.stored_layer}' ({type(self).__bases__[1].__name__}, a subclass of nn.Linear with a forward "
            f"of its own) holds its weight as {stored.scheme}, which that forward cannot multiply eagerly; run the model "
            "compiled with torch.compile(model, backend=\"fxquant\") (or fxquant.export), or keep the layer float "
            "(QuantConfig(skip=[...]))"
        )


@functools.cache
def stored_class(cls: type[nn.Module], compiled_only: bool = False) -> type[nn.Module]:
    """`cls` with StoredLayer's forward (StoredLinear, StoredConv1D) or, for a forward of its own,
    CompiledOnlyLayer's (made once per class)."""
    return type(f"Stored{cls.__name__}", (CompiledOnlyLayer if compiled_only else StoredLayer, cls), {"__module__": __name__})


def conv1d_type() -> type[nn.Module] | None:
    """transformers' Conv1D (GPT-2's linear layers, weight [K, N]) where transformers is loaded;
    without it no model holds one."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def plain_linear_forward(module: nn.Module) -> bool:
    """Whether `module` runs nn.Linear's or Conv1D's own forward: its weight's linear map and nothing else."""
    conv1d = conv1d_type()
    return type(module).forward in (nn.Linear.forward, getattr(conv1d, "forward", None))


def make_stored(module: nn.Module, scheme: str, options: object = None, layer: str = "") -> nn.Module:
    """Make `module` (nn.Linear, or Conv1D with its weight already [N, K]), the model's layer `layer`,
    run its stored weight `weight` and the scheme's other tensors (`weight_scale`, ...) with `scheme`'s
    op and `options` (its Options; None: the defaults), eagerly and compiled; returns it.

    A subclass of nn.Linear with a forward of its own runs only compiled with backend="fxquant" (or
    exported with fxquant.export): eagerly it raises an error naming the layer (CompiledOnlyLayer)."""
    register_stored_weight(module, scheme, "weight", options)
    if isinstance(module, (StoredLayer, CompiledOnlyLayer)):
        return module
    compiled_only = not plain_linear_forward(module)
    if compiled_only:
        log_once(logging.WARNING, f"fxquant: {type(module).__name__} layers have a forward of their own: with quantized weights "
                         "they run compiled with backend=\"fxquant\" (or exported), not eagerly")
        module.stored_layer = layer
    module.__class__ = stored_class(type(module), compiled_only)
    return module
