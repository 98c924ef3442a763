"""Recognize linear layers whose weights are already quantized (a loaded checkpoint).

A layer stored with a scheme's tensors, as fxquant's checkpoints store it,
    <layer>.weight        low precision [N, K]      <layer>.weight_scale   float32   (<layer>.weight_<...>: more)
runs through the scheme's op with those tensors as they are: nothing is re-quantized. Each tensor
is found as a graph input of its name (torch.export lifts every buffer) or, under Dynamo, through
STORED_WEIGHTS: the checkpoint loader registers each stored weight with the module that holds it
(the tensors are read from the module when compiling, so moving the model afterwards is fine), the
scheme fxquant.json's plan names and the scheme's options the checkpoint was made with (kept where
the compile's config leaves an option unset). The only weight stored without a declared scheme is
HF transformers' fbgemm_fp8 layout (e4m3 weight, float32 weight_scale [N, 1]): fp8_rowwise. The
config's rules, skip list and scheme do not apply to such a layer: a low-precision weight cannot
run unquantized.

Expert weights stored quantized (`fxquant.quantize_` of a transformers MoE) are held [E, N, K] with
the scheme's other tensors in the op's layout (what `quantize` makes of the [E, N, K] weight, e.g.
fp8_rowwise's weight_scale [E, N]). Stored layers and experts present their weight to Dynamo as a
float conversion, `fxquant::stored_weight` (fxquant/stored_layers.py, fxquant/stored_experts.py),
which passes/find_sites.py reads through and which no other backend can run.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fxquant.passes.find_sites import GemmSite
from fxquant.scheme import get_scheme

# What a weight stored without a declared scheme is: HF transformers' fbgemm_fp8 layout.
FOREIGN_DTYPE, FOREIGN_SCHEME = torch.float8_e4m3fn, "fp8_rowwise"
PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class StoredWeight(NamedTuple):
    module: weakref.ref  # the module holding the weight and the scheme's other tensors
    weight_name: str  # the weight's attribute
    scheme: str | None  # the scheme it was stored with; None: HF fbgemm_fp8
    options: object = None  # the scheme's Options the checkpoint was made with (None for HF fbgemm_fp8)

    def attribute(self, name: str) -> str:
        """The module attribute of the scheme's tensor `name` ("weight_scale" → "<weight_name>_scale")."""
        return self.weight_name + name.removeprefix("weight")

    def tensors(self) -> dict[str, Tensor]:
        """The scheme's tensors other than the weight that the module holds, by name."""
        module, scheme = self.module(), get_scheme(self.scheme or FOREIGN_SCHEME)
        found = {name: getattr(module, self.attribute(name), None) for name in scheme.tensors if name != "weight"}
        return {name: tensor for name, tensor in found.items() if isinstance(tensor, Tensor)}


# weight → StoredWeight, for stored weights whose other tensors the graph does not reach: Dynamo only
# passes a backend the tensors forward() uses, and nn.Linear.forward never reads `weight_scale`.
STORED_WEIGHTS = WeakIdKeyDictionary()
_STORED_KEYS = itertools.count()  # each registration's `fxquant_stored_key`


def guard_stored_tensors(module: nn.Module) -> None:
    """Make a Dynamo trace of `module` guard on which stored tensors it read. The rewrite bakes a stored
    weight's other tensors (weight_scale, ...) into the graph as constants, while Dynamo passes the weight
    itself as an input and would reuse the graph for another module of the class, with this one's
    scales; comparing the module's key (a Python int, so guarded by value; a bare read installs no guard)
    makes it compile again."""
    if module.fxquant_stored_key < 0:
        raise AssertionError("fxquant: a negative stored key")


def register_stored_weight(
    module: nn.Module, scheme: str | None = None, weight_name: str = "weight", options: object = None
) -> None:
    """Tell fxquant that `module.<weight_name>` is stored quantized with `scheme` (None: HF fbgemm_fp8),
    its other tensors in `module.<weight_name>_<...>` ("weight_scale" → `weight_scale`), made with
    `options` (its Options; None: the defaults). Checkpoint loaders call this."""
    if scheme is not None and options is None:
        options = get_scheme(scheme).options({})
    weight = module._parameters.get(weight_name)  # the stored tensor itself, not what a property presents
    weight = getattr(module, weight_name) if weight is None else weight
    STORED_WEIGHTS[weight] = StoredWeight(weakref.ref(module), weight_name, scheme, options)
    module.fxquant_stored_key = next(_STORED_KEYS)


@torch.library.custom_op("fxquant::stored_weight", mutates_args=())
def stored_weight(w_q: Tensor, dtype: torch.dtype) -> Tensor:
    """A stored weight as a trace sees it: a float tensor of its shape (stored layers and experts
    present theirs so: fxquant/stored_layers.py, fxquant/stored_experts.py). The site finder reads
    through it; only fxquant's rewrite runs it (the site on it becomes the scheme's op and this node
    goes). Run, it is an error: another backend, or a program exported without fxquant, never
    multiplies the raw codes."""
    raise RuntimeError(
        f"fxquant: a stored {w_q.dtype} weight {list(w_q.shape)} ran outside fxquant's rewrite; "
        "compile the model with backend='fxquant' (or export it with fxquant.export)"
    )


@stored_weight.register_fake
def _(w_q: Tensor, dtype: torch.dtype) -> Tensor:
    return w_q.new_empty(w_q.shape, dtype=dtype)


def is_stored(weight: Tensor) -> bool:
    """Whether `weight` is held quantized: registered so (and not cast to a float since), or HF fbgemm_fp8's e4m3."""
    return weight.dtype not in PLAIN_FLOATS and (weight in STORED_WEIGHTS or weight.dtype == FOREIGN_DTYPE)


def stored_tensor_name(site: GemmSite, name: str) -> str:
    """The qualified name of a stored weight's tensor `name`: ("mlp.up.weight", "weight_scale") → "mlp.up.weight_scale"."""
    return site.weight_name + name.removeprefix("weight")


def stored_scheme(
    site: GemmSite, find: Callable[[str], Tensor | None] = lambda qualified_name: None
) -> tuple[str | None, dict[str, Tensor], str]:
    """(scheme, its tensors other than the weight, note) of a stored weight; scheme None when it cannot run.
    `find`: a tensor the graph holds under a qualified name, or None (it wins over the module's)."""
    stored = STORED_WEIGHTS.get(site.weight)
    if site.weight_is_kn:
        return None, {}, f"stored {site.weight.dtype} weight laid out [K, N]; want [N, K]"
    scheme = get_scheme(stored.scheme if stored is not None and stored.scheme else FOREIGN_SCHEME)
    in_graph = {name: find(stored_tensor_name(site, name)) for name in scheme.tensors if name != "weight"}
    tensors = {**(stored.tensors() if stored is not None else {}), **{n: t for n, t in in_graph.items() if t is not None}}
    n, k = site.out_features, site.in_features
    missing = [name for name, dtype in scheme.tensors.items() if name != "weight" and getattr(tensors.get(name), "dtype", None) != dtype]
    if missing:
        dtype = str(scheme.tensors[missing[0]]).removeprefix("torch.")
        return None, {}, f"stored {site.weight.dtype} weight without a {dtype} {stored_tensor_name(site, missing[0])}"
    options = stored.options if stored is not None and stored.options is not None else scheme.options({})
    if site.experts is not None:
        problem = expert_problem(scheme.name, {"weight": site.weight, **tensors}, options)
    else:
        problem = scheme.stored_problem({"weight": site.weight, **tensors}, n, k, options)
    if problem is not None:
        shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in tensors.items())
        shape = list(site.weight.shape) if site.experts is not None else [n, k]
        return None, {}, f"stored as {scheme.name}, but its weight is {site.weight.dtype} {shape} with {shapes}: {problem}"
    return scheme.name, tensors, "stored quantized weights"


def expert_problem(scheme: str, tensors: dict[str, Tensor], options: object) -> str | None:
    """Why expert tensors stored for an [E, N, K] weight (by name) are not what `scheme` makes of one
    (dtypes and shapes in the op's layout), or None."""
    weight = tensors["weight"]
    expected = get_scheme(scheme).quantize(torch.empty(weight.shape, device="meta"), options)
    for name, want in expected.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.dtype != want.dtype or tensor.shape != want.shape:
            found = "none" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
            return f"its {name} is {found}, not {want.dtype} {list(want.shape)}"
    return None


def op_tensor(scheme: str, name: str, tensor: Tensor, n: int, k: int, options: object) -> Tensor:
    """A stored tensor in the shape `scheme`'s op takes it (HF's per-channel [N, 1] scale → [N])."""
    return tensor.reshape(get_scheme(scheme).op_shape(name, tuple(tensor.shape), n, k, options))
