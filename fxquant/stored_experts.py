"""transformers MoE experts whose 3-D weights are stored quantized, run by fxquant's expert ops.

    make_stored_experts(experts, {"gate_up_proj": (torch.bfloat16, "fp8_rowwise", options), ...})
    experts(hidden, top_k_index, top_k_weights)      # eager: its forward traced and rewritten, run op by op
    torch.compile(model, backend="fxquant")(x)       # traced as the float experts: passes/stored_weights.py

An Experts module (transformers' `use_experts_implementation`) holds `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I] (gpt-oss: transposed, [E, K, N]) and runs them through its
`experts_implementation`. Stored, each is the scheme's [E, N, K] weight (N before K for gpt-oss too)
with its other tensors as buffers (`gate_up_proj_scale`, the op's layout), registered as stored.
The module's class becomes a subclass of its own whose properties present each stored weight to a
trace in its float dtype and layout (`fxquant::stored_weight(W_q, torch.bfloat16)`, a
conversion that only the rewrite may run, then `.transpose(-2, -1)` for gpt-oss), so Dynamo traces
the model's own code on fake floats and fxquant's passes read the site on the stored weight through
the conversion; the rewrite leaves the conversion dead. The graph is then the float model's with the stored tensors in place of the
quantized copies, so compiling it gives the float model's compiled outputs.

Eagerly (not tracing) the module's forward runs through Dynamo with a backend that rewrites the
graph and runs it op by op (no Inductor): the same ops and numerics as compiled on the CPU.
transformers' `eager` implementation runs its expert loop outside any graph (Dynamo skips the frame
at its data-dependent branch), where a stored weight cannot run: reading one there is an error
naming the module (quantize_ leaves such experts in float).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, fx, nn

from fxquant.passes.stored_weights import PLAIN_FLOATS, STORED_WEIGHTS, guard_stored_tensors, register_stored_weight


# The experts implementations whose matmuls a trace reaches whole (transformers' `eager` loop runs
# outside the graphs, where a stored weight cannot run).
STORED_IMPLEMENTATIONS = ("batched_mm", "grouped_mm")


class StoredExperts:
    """The forward of an Experts module whose 3-D weights are stored quantized (mixed into its class)."""

    # weight name → the float dtype the module held it in (its trace presents it so)
    fxquant_float_dtypes: dict[str, torch.dtype]

    def forward(self, *args, **kwargs):
        if _tracing():
            return super().forward(*args, **kwargs)
        return _run_rewritten(self, *args, **kwargs)


def _tracing() -> bool:
    """Whether Dynamo or torch.export traces this code (not a frame Dynamo left to run eagerly, where
    torch.compiler.is_compiling() may still say True)."""
    return torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting()


def _presented(name: str) -> property:
    """The weight `name` as a trace sees it: the stored tensor presented in its float dtype
    (fxquant::stored_weight; transposed back to [E, K, N] for a transposed module); a float tensor
    assigned since, as it is."""

    def get(self) -> Tensor:
        stored = self._parameters[name]
        if stored is None or stored.dtype in PLAIN_FLOATS:
            return stored
        implementation = getattr(getattr(self, "config", None), "_experts_implementation", None)
        if implementation not in STORED_IMPLEMENTATIONS or not _tracing():
            raise RuntimeError(
                f"fxquant: {type(self).__name__}.{name} is stored {stored.dtype} and runs only in fxquant's graphs, "
                f"through experts_implementation 'batched_mm' or 'grouped_mm'; {implementation!r} reads it outside "
                "them (transformers' 'eager' loop runs outside any graph)"
            )
        guard_stored_tensors(self)
        presented = torch.ops.fxquant.stored_weight(stored, self.fxquant_float_dtypes[name])
        return presented.transpose(-2, -1) if getattr(self, "is_transposed", False) else presented

    return property(get)


@functools.cache
def stored_experts_class(cls: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    """`cls` with StoredExperts' forward and a presenting property per stored weight (made once)."""
    properties = {name: _presented(name) for name in names}
    return type(f"Stored{cls.__name__}", (StoredExperts, cls), {"__module__": __name__, **properties})


def make_stored_experts(module: nn.Module, stored: dict[str, tuple[torch.dtype, str, object]]) -> nn.Module:
    """Make `module` run its stored expert weights, eagerly and compiled; returns it. `stored`: for each
    weight name, (the float dtype it was held in, its scheme, the scheme's Options); the module holds
    `<name>` [E, N, K] and the scheme's other tensors `<name>_<...>` in the op's layout."""
    if isinstance(module, StoredExperts):
        raise ValueError(f"fxquant: {type(module).__name__} already holds stored expert weights")
    for name, (_, scheme, options) in stored.items():
        register_stored_weight(module, scheme, name, options)
    module.fxquant_float_dtypes = {name: dtype for name, (dtype, _, _) in stored.items()}
    module.__class__ = stored_experts_class(type(module), tuple(stored))
    return module


def _call_forward(module: nn.Module, *args, **kwargs):
    return super(StoredExperts, module).forward(*args, **kwargs)


def _rewrite_and_run(gm: fx.GraphModule, example_inputs, **_) -> object:
    """A Dynamo backend: fxquant's passes on the graph, run op by op. Only the stored weights are
    rewritten (they keep their scheme whatever the config); any float matmul stays as eager runs it.

    The graph serves every Experts module of its shapes (Dynamo passes their weights as inputs), but
    the rewrite holds the stored tensors the forward does not read (the scales) as buffers of the
    first module's: each call binds those of the module whose weight it is given."""
    from fxquant.config import QuantConfig
    from fxquant.dynamo_params import dynamo_module_tensor
    from fxquant.pipeline import quantize_graph

    plan, _ = quantize_graph(gm, dynamo_module_tensor, QuantConfig(skip=("*",)))
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    bindings = [(placeholders.index(entry.site.weight_node), _buffer_names(entry)) for entry in plan.rewritten
                if entry.stored is not None and entry.site.experts is not None]

    def run(*args):
        for index, names in bindings:
            tensors = STORED_WEIGHTS[args[index]].tensors()
            for name, attr in names.items():
                gm._buffers[attr] = tensors[name]
        return gm.forward(*args)

    return run


def _buffer_names(entry) -> dict[str, str]:
    """The scheme's tensor name → the graph's buffer holding it, for a rewritten stored expert site."""
    names = {}
    for name in entry.stored:
        node = entry.call.tensor(name)
        node = node if node.op == "get_attr" else node.args[0]  # an indexed site's select of the buffer
        if node.op == "get_attr":
            names[name] = node.target
    return names


@functools.cache
def _compiled_forward():
    return torch.compile(_call_forward, backend=_rewrite_and_run)


def _run_rewritten(module: nn.Module, *args, **kwargs):
    return _compiled_forward()(module, *args, **kwargs)
