"""Checkpoints into a tensor-parallel model: each rank reads only its slice of every split tensor.

    parallelize_module(model, mesh, plan)        # on the meta device (fxquant.empty_weights()) or float
    fxquant.load_quantized(directory, model)     # q_proj.weight e4m3 [N, K] Shard(0): rows rank*N/r ... of the file

A tensor the model holds as a DTensor (1-D mesh, Shard or Replicate) is read with
`safe_open(...).get_slice(name)[...]` as far as this rank's part goes, and assigned as a DTensor of
the whole tensor's shape with the model's placement. A quantized layer's tensors are split as its
weight is, along the dims its scheme declares (`Scheme.shard_dims`, as `quantize_sharded` splits
them when compiling): a column-wise layer's per-channel scale follows its rows, a row-wise layer's
is whole on every rank, fp8_blockwise's block scales follow both. So each rank holds exactly the
slice of the single-process model's tensors that compiling the float model would give it.

Every split is checked before anything is read (`tensor_slices`): a quantized layer split unevenly,
not on whole blocks or by a scheme without shard_dims, a Conv1D or expert weight split over ranks,
a foreign checkpoint's tensor converted on loading, a mesh of more than one dim or a Partial
placement is refused with the layer and the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fxquant.checkpoint_layers import is_conv1d, stored_layout
from fxquant.checkpoint_metadata import tensor_key
from fxquant.passes.stored_weights import op_tensor
from fxquant.scheme import get_scheme
from fxquant.tensor_parallel import is_dtensor, register_op_sharding, scheme_placement, shard_problem, split_side

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch without distributed: no model holds a DTensor
    DTensor = None


@dataclasses.dataclass(frozen=True)
class TensorSlice:
    """This rank's part of one checkpoint tensor: `shape` (the whole tensor's, as the file holds it)
    split over `mesh` by `placement`; `start:stop` along the placement's dim (whole when Replicate)."""

    mesh: object
    placement: object
    shape: tuple[int, ...]
    start: int = 0
    stop: int = 0

    def read(self, tensors: object, name: str) -> Tensor:
        """The part from an open safetensors file, as a DTensor of the whole tensor."""
        if isinstance(self.placement, Shard):
            index = (slice(None),) * self.placement.dim + (slice(self.start, self.stop),)
            part = tensors.get_slice(name)[index]
        else:
            part = tensors.get_tensor(name)
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return DTensor.from_local(part.contiguous(), self.mesh, [self.placement], run_check=False, shape=self.shape, stride=stride)


def _slice(mesh: object, placement: object, shape: tuple[int, ...]) -> TensorSlice:
    """`placement`'s part for this rank, as DTensor splits (torch.chunk: ceil(size / ranks) each)."""
    if not isinstance(placement, Shard):
        return TensorSlice(mesh, placement, shape)
    size, ranks, rank = shape[placement.dim], mesh.size(), mesh.get_local_rank()
    chunk = -(-size // ranks)
    start = min(rank * chunk, size)
    return TensorSlice(mesh, placement, shape, start, min(start + chunk, size))


def _placement_problem(tensor: Tensor) -> str | None:
    """Why a DTensor's placement cannot be read slice by slice, or None."""
    if tensor.device_mesh.ndim != 1:
        return f"a {tensor.device_mesh.ndim}-D device mesh (fxquant reads 1-D tensor-parallel meshes only)"
    (placement,) = tensor.placements
    return None if isinstance(placement, (Shard, Replicate)) else f"placement {placement} (Shard or Replicate only)"


def _file_dim(op_shape: tuple[int, ...], file_shape: tuple[int, ...], dim: int) -> int | None:
    """The file dim that holds the op layout's `dim` (a per-channel [N] scale is [N, 1] in the file):
    the same index, where the dims up to it agree; else None."""
    return dim if op_shape[: dim + 1] == file_shape[: dim + 1] else None


def _refusal(directory: object, layer: str, reason: str) -> ValueError:
    return ValueError(f"fxquant: {directory}: cannot read layer '{layer}' slice by slice into the tensor-parallel model: {reason}")


def _layer_slices(directory: object, entry: dict, module: nn.Module, options: object) -> dict[str, TensorSlice]:
    """The slices of a quantized layer's tensors, split as its DTensor weight is (`shard_dims`)."""
    layer, scheme, (n, k) = entry["layer"], get_scheme(entry["scheme"]), entry["shape"]
    weight = module._parameters["weight"]
    if is_conv1d(module):
        raise _refusal(directory, layer, "a Conv1D's weight split over ranks (nn.Linear only)")
    problem = shard_problem(weight, False, layer, scheme, options)
    if problem is not None:
        raise _refusal(directory, layer, problem)
    side, mesh = split_side(weight), weight.device_mesh
    op_layout = scheme.layout(n, k, options)
    slices = {}
    for name, (_, file_shape) in stored_layout(scheme.name, n, k, options, False).items():
        placement = scheme_placement(scheme, name, side)
        if isinstance(placement, Shard):
            dim = _file_dim(op_layout[name][1], file_shape, placement.dim)
            if dim is None or file_shape[dim] % mesh.size():
                why = "is not held along that dim in the file" if dim is None else "does not split evenly"
                raise _refusal(directory, layer, f"{name} {list(file_shape)} {why} over {mesh.size()} ranks")
            placement = Shard(dim)
        slices[tensor_key(layer, name)] = _slice(mesh, placement, file_shape)
    return slices


def tensor_slices(directory: object, model: nn.Module, metadata: dict, layer_options: Mapping[str, object],
                  tied: Mapping[str, str], converted: set[str], joined: set[str], device: str | torch.device) -> dict[str, TensorSlice]:
    """{stored name: this rank's slice} for every checkpoint tensor `model` holds as a DTensor, a
    quantized layer's tensors split as its weight; the stored name is the file's (after `tied`).
    Raises, naming the tensor or layer, where a split cannot be read (see the module docstring);
    `layer_options`: each quantized layer's scheme options, `converted`: the names a foreign
    checkpoint converts on loading, `joined`: expert weights gathered from per-expert tensors."""
    held = {name: t for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
            if is_dtensor(t)}
    if not held:
        return {}
    for name, tensor in held.items():
        if name in joined:
            problem = "an expert weight split over ranks"
        elif tensor.device_mesh.device_type != torch.device(device).type:
            problem = f"its mesh is on {tensor.device_mesh.device_type}, the load on {torch.device(device).type}"
        else:
            problem = _placement_problem(tensor)
        if problem is not None:
            raise ValueError(f"fxquant: {directory}: cannot read '{name}' slice by slice into the tensor-parallel model: {problem}")
    slices: dict[str, TensorSlice] = {}
    modules = dict(model.named_modules())
    quantized_layers = set()
    for entry in metadata["plan"]:
        if entry["scheme"] is None or "expert_names" in entry:
            continue
        module = modules[entry["layer"]]
        if is_dtensor(module._parameters.get("weight")):
            slices.update(_layer_slices(directory, entry, module, layer_options[entry["layer"]]))
            quantized_layers.add(tensor_key(entry["layer"], "weight"))
    for name, tensor in held.items():
        if name in quantized_layers:
            continue
        part = _slice(tensor.device_mesh, tensor.placements[0], tuple(tensor.shape))
        if isinstance(part.placement, Shard) and part.stop - part.start != tensor.to_local().shape[part.placement.dim]:
            raise ValueError(f"fxquant: {directory}: '{name}' holds {list(tensor.to_local().shape)} on this rank, not "
                             f"rows {part.start}:{part.stop} of dim {part.placement.dim} as DTensor splits {list(tensor.shape)}")
        slices[tied.get(name, name)] = part
    for name, part in slices.items():
        if name in converted and isinstance(part.placement, Shard):
            raise ValueError(f"fxquant: {directory}: cannot read '{name}' slice by slice into the tensor-parallel model: "
                             "the checkpoint's layout converts it on loading (a foreign checkpoint); load it whole")
    return slices


def register_layer_sharding(layer: str, module: nn.Module, scheme: str, options: object) -> None:
    """Give DTensor the sharding rule of the op a loaded layer runs eagerly (StoredLinear's forward),
    as compiling registers it at the rewrite; an activation on the meta device stands for the real one."""
    plugin, (n, k) = get_scheme(scheme), module.weight.shape
    tensors = {name: op_tensor(scheme, name, getattr(module, name), n, k, options) for name in plugin.tensors}
    register_op_sharding(plugin.call(layer, torch.empty(1, k, device="meta"), tensors, module.bias, options))
