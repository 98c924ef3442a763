"""Tensor-parallel layers: weights that are DTensors, as `parallelize_module` (ColwiseParallel,
RowwiseParallel) or transformers' `tp_plan` leave them.

Dynamo hands the backend a graph whose parameters are DTensors; fxquant plans and rewrites it as any
other (layer names and global shapes), and AOTAutograd then turns the DTensor program into each
rank's local program with its collectives, which Inductor compiles. Three things make a quantized
layer a DTensor layer:

    placements    each scheme tensor is split as its weight is, along the dim the scheme declares for
                  that side (`Scheme.shard_dims`: a per-channel scale follows a column-wise split and
                  is whole on every rank under a row-wise one);
    quantization  the tensors are those of the whole weight, each rank holding its slice, so every
                  rank's codes and scales are the single-device model's. A column-wise weight whose
                  tensors all run along N is quantized from the local shard alone; otherwise the
                  weight is gathered once (one float weight in transit) and sliced;
    sharding      each op has a DTensor sharding rule by its argument names: column-wise (activation
                  whole → output split on its last dim), row-wise (activation split on K → partial
                  sums, reduced where the parallel style reduces them; each rank quantizes its slice
                  of the activation per token, as vLLM does), or all whole.

The plan checks that a split leaves every rank a shape its scheme runs (`shard_problem`: even splits,
the scheme's shape rule on the local shape, so 128x128 blocks need shard boundaries on whole blocks).
Meshes of more than one dim (FSDP with TP) are not read: such layers are skipped with the reason.

parallelize_module frames each column-wise layer in its hooks, which Dynamo's graph shows as

    a = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)    (maybe redistributes that keep R)
    y = op(a, W...)                                                    (Shard(-1): no collective)
    h = y.redistribute(placements=(Shard(-1),), async_op=True).to_local()   (the redistribute keeps S(2))

so h is the local op on x and this rank's rows: `from_local_source` and `local_output` read the two
ends, and the merge pass stacks such layers on their shared x as it stacks local parts (`.to_local()`
weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, fx

from fxquant.passes.find_sites import fake_value
from fxquant.scheme import Scheme, SchemeCall

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import register_sharding
except ImportError:  # torch without distributed: no weight is a DTensor
    DTensor = None


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a DTensor; any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def held_like(local_part: Tensor, like: Tensor) -> Tensor:
    """`local_part` held as `like` is: a DTensor of like's mesh, placements and global shape around it
    (the same storage: writes to either reach the other) where `like` is one, else `local_part`."""
    if not is_dtensor(like):
        return local_part
    return DTensor.from_local(local_part, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _is_redistribute(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == "redistribute"


def _keeps_placements(node: fx.Node) -> bool:
    """A redistribute `node` to the mesh, placements, shape and dtype its input already has: no collective."""
    value, source = fake_value(node), fake_value(node.args[0])
    mesh = node.args[1] if len(node.args) > 1 else node.kwargs.get("device_mesh")
    return (mesh is None and hasattr(value, "placements") and hasattr(source, "placements") and value.placements == source.placements
            and value.shape == source.shape and value.dtype == source.dtype)


def from_local_source(activation: object) -> tuple[fx.Node, str | None] | None:
    """(x, why the op on the DTensor cannot be read as an op on x, or None) where `activation` is
    `DTensor.from_local(x, ...)` (a parallel style's input hook), maybe redistributed; None where it is
    not made so. Read as local: replicated, no `run_check` (a broadcast), no shape or stride given, and
    only redistributes that keep its placements."""
    node, moved = activation, None
    while _is_redistribute(node):
        if not _keeps_placements(node):
            moved = node
        node = node.args[0]
    if not (DTensor is not None and isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is DTensor.from_local and isinstance(node.args[0], fx.Node)):
        return None
    arguments = dict(zip(("local_tensor", "device_mesh", "placements"), node.args), **node.kwargs)
    placements = tuple(arguments.get("placements") or ())
    if moved is not None:
        to = getattr(fake_value(moved), "placements", "?")
        return node.args[0], f"its input is redistributed from {placements} to {to} (a collective of its own)"
    if not placements or not all(isinstance(p, Replicate) for p in placements):
        return node.args[0], f"its input is made from local with placements {placements} (Replicate only)"
    if arguments.get("run_check") or arguments.get("shape") is not None or arguments.get("stride") is not None:
        return node.args[0], "its input is made from local with run_check, shape or stride"
    return node.args[0], None


def local_output(node: fx.Node) -> fx.Node | None:
    """The `.to_local()` through which alone `node`'s DTensor output is read (a parallel style's output
    hook with use_local_output), through redistributes that keep its placements; None where it is read
    otherwise."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op == "call_method" and user.target == "to_local" and len(user.args) == 1:
            return user if all(value is None for value in user.kwargs.values()) else None
        if not (_is_redistribute(user) and _keeps_placements(user)):
            return None
        node = user
    return None


def split_side(weight: Tensor, weight_is_kn: bool = False) -> str | None:
    """How a DTensor weight is split, in the op's [N, K] terms: "N" (column-wise), "K" (row-wise) or
    None (whole on every rank)."""
    (placement,) = weight.placements
    if not isinstance(placement, Shard):
        return None
    dim = placement.dim % weight.dim()
    n_dim = weight.dim() - (1 if weight_is_kn else 2)
    return "N" if dim == n_dim else "K"


def shard_problem(weight: Tensor, weight_is_kn: bool, layer: str, scheme: Scheme, options) -> str | None:
    """Why a DTensor weight's split cannot be quantized with `scheme`, or None: a mesh of one dim, a
    split by Shard only, an even split, and a local shape the scheme's shape rule accepts."""
    if weight.device_mesh.ndim != 1:
        return f"a {weight.device_mesh.ndim}-D device mesh (fxquant reads 1-D tensor-parallel meshes only)"
    (placement,) = weight.placements
    if not isinstance(placement, (Shard, Replicate)):
        return f"weight placement {placement} (Shard or Replicate only)"
    side = split_side(weight, weight_is_kn)
    if side is None:
        return None
    if not scheme.shard_dims:
        return f"{scheme.name} does not say how its tensors split (shard_dims)"
    n, k = weight.shape[-1], weight.shape[-2]
    if not weight_is_kn:
        n, k = k, n
    ranks = weight.device_mesh.size()
    size = n if side == "N" else k
    if size % ranks:
        return f"{side}={size} does not split evenly over {ranks} ranks"
    local_n, local_k = (n // ranks, k) if side == "N" else (n, k // ranks)
    reason = scheme.unsupported(layer, local_n, local_k, options)
    return None if reason is None else f"{'column' if side == 'N' else 'row'}-wise shard {local_n} x {local_k}: {reason}"


def shard_note(weight: Tensor, weight_is_kn: bool) -> str:
    """The plan's word on a DTensor weight: which part of it this rank holds."""
    side = split_side(weight, weight_is_kn)
    rank, ranks = weight.device_mesh.get_local_rank(), weight.device_mesh.size()
    if side is None:
        return f"tensor parallel: whole on each of {ranks} ranks"
    local_shape = local(weight).shape
    size = local_shape[-2] if (side == "N") != weight_is_kn else local_shape[-1]
    start = rank * size
    return f"{'column' if side == 'N' else 'row'}-wise: {side} {start}-{start + size - 1} on rank {rank} of {ranks}"


def scheme_placement(scheme: Scheme, name: str, side: str | None) -> object:
    """How the scheme's tensor `name` (op layout) splits when its weight splits along `side` ("N", "K" or None)."""
    dims = scheme.shard_dims.get(name, (None, None))
    dim = {"N": dims[0], "K": dims[1]}.get(side)
    return Replicate() if dim is None else Shard(dim)


def quantize_sharded(weight: Tensor, scheme: Scheme, quantize: Callable[[Tensor], Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The scheme's tensors of DTensor `weight` (an [N, K] view), as DTensors split as the weight is;
    `quantize` maps a plain [N, K] weight to them."""
    side = split_side(weight)
    placements = {name: scheme_placement(scheme, name, side) for name in scheme.tensors}
    mesh = weight.device_mesh
    if side == "N" and all(isinstance(p, Shard) for p in placements.values()):
        tensors = quantize(weight.to_local())  # per-row quantities: the local rows quantize alone
        return {name: DTensor.from_local(t.contiguous(), mesh, [placements[name]], run_check=False,
                                         shape=_global_shape(t, placements[name], mesh.size()),
                                         stride=_contiguous_stride(_global_shape(t, placements[name], mesh.size())))
                for name, t in tensors.items()}
    tensors = quantize(weight.full_tensor())
    return {name: distribute_tensor(t.contiguous(), mesh, [placements[name]], src_data_rank=None)
            for name, t in tensors.items()}


def _global_shape(local_tensor: Tensor, placement: object, ranks: int) -> tuple[int, ...]:
    shape = list(local_tensor.shape)
    shape[placement.dim] *= ranks  # even splits only (shard_problem)
    return tuple(shape)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def register_op_sharding(call: SchemeCall) -> None:
    """A DTensor sharding rule for `call`'s op, by its argument names: the weight's tensors keep their
    placements, the activation and bias follow the weight's split, any other tensor argument is
    whole. (Registered at each rewrite, as DTensor registers rules: per op, the last one wins.)"""
    arguments = [argument.name for argument in call.op._schema.arguments]
    weight_argument = call.tensors["weight"]
    tensor_arguments = set(call.tensors.values())

    def rule(*args, **kwargs):
        values = dict(zip(arguments, args), **kwargs)
        (weight_placement,) = values[weight_argument].placements
        rank = values[call.activation].ndim
        if isinstance(weight_placement, Shard) and weight_placement.dim == 0:  # column-wise: N
            output, activation, bias = Shard(rank - 1), Replicate(), Shard(0)
        elif isinstance(weight_placement, Shard):  # row-wise: K; each rank adds its part of the bias
            output, activation, bias = Partial(), Shard(rank - 1), Partial()
        else:
            output, activation, bias = Replicate(), Replicate(), Replicate()
        inputs = []
        for name in arguments:
            value = values.get(name)
            if not hasattr(value, "placements"):
                inputs.append(None)
            elif name == call.activation:
                inputs.append(activation)
            elif name in tensor_arguments:
                inputs.append(value.placements[0])
            else:
                inputs.append(bias if name == "bias" else Replicate())
        return [([output], inputs)]

    register_sharding(call.op)(rule)
