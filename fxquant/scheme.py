"""The scheme plugin contract and its registry: everything fxquant knows about one quantization scheme.

    class MyScheme(Scheme):
        name = "my_scheme"
        Options = MyOptions                      # a frozen dataclass, validated in __post_init__
        def quantize(self, weight, options): ... # [N, K] float → {"weight": ..., "weight_scale": ...}
        def call(self, layer, x, tensors, bias, options, values=None): return SchemeCall(...)
    register_scheme(MyScheme())                  # QuantConfig(scheme="my_scheme") now works everywhere

The passes, export, checkpoints and loaded layers read a scheme only through this class, so a new
scheme is one file (plus its op and kernels) and no edit elsewhere; the built-ins are in
fxquant/schemes/. As in vLLM's QuantizationConfig / LinearMethodBase and transformers' quantizer
registry, a scheme is looked up by name, owns its weight tensors (any number, any shape, by name)
and emits its own op; unlike them it never touches a module: it maps tensors to tensors and a
layer to one graph node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import Tensor


class NoHFLayout(ValueError):
    """An HF config.json layout cannot describe a checkpoint: its scheme, an option or a quantized layer."""


@dataclass(frozen=True)
class NoOptions:
    """The options of a scheme that has none."""


@dataclass(frozen=True)
class SchemeCall:
    """The node a scheme emits for one layer, by name: `op(*args)` with `args` in the op's schema order.

    Args:
        op: the op overload, e.g. torch.ops.fxquant.int8_linear.default.
        args: the op's argument name → graph node or constant, every argument of its schema.
        tensors: the scheme's tensor name → the op argument that takes it ({"weight": "w_q", ...}).
        activation: the op argument that takes the activation.
    """

    op: torch._ops.OpOverload
    args: Mapping[str, object]
    tensors: Mapping[str, str]
    activation: str = "x"

    def node_args(self) -> tuple:
        """The arguments in the op's schema order; optional ones at the end that `args` leaves out
        keep their defaults (e.g. a grouped expert op's `rows`)."""
        arguments = list(self.op._schema.arguments)
        while arguments and arguments[-1].name not in self.args and arguments[-1].has_default_value():
            arguments.pop()
        return tuple(self.args[argument.name] for argument in arguments)

    def tensor(self, name: str) -> object:
        return self.args[self.tensors[name]]

    def with_tensors(self, values: Mapping[str, object]) -> SchemeCall:
        """The same call on other tensors (a merged layer's stacked buffers), by scheme tensor name."""
        replaced = {self.tensors[name]: value for name, value in values.items()}
        return dataclasses.replace(self, args={**self.args, **replaced})


class Scheme:
    """One quantization scheme: subclass it, set `name` (and `Options`), implement `quantize` and
    `call`, and `register_scheme` an instance. The other methods have defaults that suit a scheme whose
    tensors are all computed from the weight and stored as they are.

    Tensor names: "weight" is the low-precision weight, [N, K] in the op's layout, stored under the
    layer's own `weight` key; every other tensor's name starts with "weight_" ("weight_scale",
    "weight_zero_point") and is stored as `<layer>.<name>` (a buffer of the loaded module).
    """

    name: ClassVar[str]
    # The scheme's tensors and their dtypes, "weight" first: what `quantize` returns and checkpoints hold.
    tensors: ClassVar[Mapping[str, torch.dtype]]
    Options: ClassVar[type] = NoOptions
    # Each tensor's dim that runs along N (stacking layers that share an input concatenates there);
    # empty: layers are never stacked (e.g. one scale for the whole tensor).
    merge_dims: ClassVar[Mapping[str, int]] = MappingProxyType({})
    # Tensor parallelism (fxquant/tensor_parallel.py): each tensor's (N dim, K dim), None where it does
    # not run along that side; a tensor not named, or split the way it has no dim for, is whole on
    # every rank (one scale for the whole weight). Empty: the scheme does not say, and a split
    # weight is skipped with that reason (e.g. blocks of a flattened weight split neither way).
    shard_dims: ClassVar[Mapping[str, tuple[int | None, int | None]]] = MappingProxyType({})
    # True where "weight" packs several values a byte along K (nf4 / fp4: [N, K / 2]): checkpoints then
    # hold a Conv1D's weight as the op takes it, not transposed to GPT-2's [K, N].
    packed_weight: ClassVar[bool] = False

    def quantize(self, weight: Tensor, options) -> dict[str, Tensor]:
        """The named tensors of a float weight [N, K] ([E, N, K]: experts, for a scheme with batched or
        grouped forms), "weight" first, in the op's layout. It must also run on the meta device (`layout`
        calls it there), or the scheme overrides `layout`."""
        raise NotImplementedError

    def call(self, layer: str, x: object, tensors: Mapping[str, object], bias: object, options,
             values: Mapping[str, Tensor] | None = None) -> SchemeCall:
        """The op node for `layer` on activation `x`, `tensors` (graph nodes or tensors, by name) and
        `bias`; `values` are the tensors themselves where fxquant quantized them (None: stored weights)."""
        raise NotImplementedError

    def call_batched(self, layer: str, x: object, tensors: Mapping[str, object], expert_ids: object, options,
                     values: Mapping[str, Tensor] | None = None) -> SchemeCall:
        """A batched site's op node: row s of x [S, K] times expert `expert_ids[s]` ([S] int) of the
        [E, N, K] weight, → [S, N]. Schemes that do not override it have no batched form."""
        raise NotImplementedError

    def call_grouped(self, layer: str, x: object, tensors: Mapping[str, object], offsets: object, options,
                     values: Mapping[str, Tensor] | None = None) -> SchemeCall:
        """A grouped site's op node: the rows of x [S, K] in expert g's group (ending at `offsets[g]`, an
        int32 [E] cumulative count) times expert g of the [E, N, K] weight, → [S, N] (rows past the last
        group: zero). Schemes that do not override it have no grouped form."""
        raise NotImplementedError

    def site_kinds(self) -> frozenset[str]:
        """The GEMM site kinds the scheme runs: "linear", and "batched" / "grouped" where it overrides
        `call_batched` / `call_grouped` (its `quantize` then takes [E, N, K] weights too)."""
        overridden = {kind for kind in ("batched", "grouped")
                      if getattr(type(self), f"call_{kind}") is not getattr(Scheme, f"call_{kind}")}
        return frozenset({"linear", *overridden})

    def unsupported(self, layer: str, n: int, k: int, options) -> str | None:
        """Why the scheme cannot quantize `layer`'s [N, K] weight, or None."""
        return None

    def decompositions(self) -> Mapping[torch._ops.OpOverload, Callable]:
        """Its ops' decompositions for Inductor on CUDA (into aten ops it fuses, e.g. the activation
        quantization into its producer, and GEMM ops with lowerings of their own): op → function taking
        the op's arguments. fxquant/inductor/install.py adds them to Inductor's table, declining off
        CUDA. None: the op runs its own CUDA implementation, an extern call."""
        return {}

    def cache_key(self, options) -> Hashable:
        """What the quantized tensors depend on besides the weight (layers share a copy when equal)."""
        return options

    def folds_tensors(self, options) -> bool:
        """Whether `call` folds tensor values into constants: such copies are never refreshed in place
        (a changed weight needs a recompile) and checkpoints refuse them."""
        return False

    def fallback(self, device: torch.device) -> tuple[str, str] | None:
        """(scheme, reason) to run instead on `device` when this one cannot run there, else None."""
        return None

    def layout(self, n: int, k: int, options) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each tensor's (dtype, shape) in the op's layout for an [N, K] weight (by quantizing on meta)."""
        tensors = self.quantize(torch.empty(n, k, device="meta"), options)
        return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}

    def file_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A tensor's shape in checkpoint files, from its shape in the op's layout."""
        return shape

    def op_shape(self, name: str, shape: tuple[int, ...], n: int, k: int, options) -> tuple[int, ...] | None:
        """The op's shape for a stored tensor `name` of `shape`, or None when it does not fit the scheme."""
        dtype_shape = self.layout(n, k, options).get(name)
        if dtype_shape is None or shape not in (dtype_shape[1], self.file_shape(name, dtype_shape[1])):
            return None
        return dtype_shape[1]

    def stored_problem(self, tensors: Mapping[str, Tensor], n: int, k: int, options) -> str | None:
        """Why tensors stored for an [N, K] layer (by name, "weight" [N, K] included) cannot run as this
        scheme, or None."""
        for name, dtype in self.tensors.items():
            tensor = tensors.get(name)
            if tensor is None or tensor.dtype != dtype:
                return f"no {dtype} {name}" if tensor is None else f"its {name} is {tensor.dtype}, not {dtype}"
            if self.op_shape(name, tuple(tensor.shape), n, k, options) is None:
                return f"its {name} is {list(tensor.shape)}, which does not fit [{n}, {k}]"
        return None

    def hf_config(self, layout: str, options) -> dict:
        """This scheme's part of config.json's quantization_config in HF `layout` ("fbgemm_fp8",
        "compressed-tensors": fxquant/hf_formats.py says what each part holds); NoHFLayout where none."""
        raise NoHFLayout(f"fxquant: {layout} has no {self.name} layout")

    def options(self, values: Mapping[str, object]) -> object:
        """The scheme's Options from `values` (option name → value); unknown names are an error."""
        known = [field.name for field in dataclasses.fields(self.Options)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"fxquant: {self.name} has no option(s) {', '.join(unknown)}; its options: {', '.join(known) or 'none'}")
        return self.Options(**values)

    def option_names(self) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(self.Options))


_REGISTRY: dict[str, Scheme] = {}
SCHEMES: Mapping[str, Scheme] = MappingProxyType(_REGISTRY)  # name → scheme, in registration order


def register_scheme(scheme: Scheme) -> Scheme:
    """Make `scheme` available by its name (to QuantConfig, the passes, checkpoints); returns it."""
    if scheme.name in _REGISTRY:
        raise ValueError(f"fxquant: a scheme named {scheme.name!r} is already registered")
    names = list(scheme.tensors)
    if names[:1] != ["weight"] or not all(name.startswith("weight_") for name in names[1:]):
        raise ValueError(f"fxquant: scheme {scheme.name!r}: its tensors are 'weight' and names starting 'weight_', not {names}")
    _REGISTRY[scheme.name] = scheme
    return scheme


def unregister_scheme(name: str) -> None:
    """Remove a registered scheme (tests, plugins that unload)."""
    del _REGISTRY[name]


def get_scheme(name: str) -> Scheme:
    """The registered scheme `name`; an unknown name is an error listing the registered ones."""
    scheme = _REGISTRY.get(name)
    if scheme is None:
        raise ValueError(f"fxquant: unknown scheme {name!r}; valid schemes: {', '.join(_REGISTRY)}")
    return scheme
