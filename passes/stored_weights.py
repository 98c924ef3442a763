"""Recognize linear layers whose weights are already quantized (a loaded checkpoint).

A layer stored the way HF transformers' `fbgemm_fp8` and fxquant's checkpoints store it,
    <layer>.weight        e4m3 or int8 [N, K]       <layer>.weight_scale   float32
runs through fxquant's op with those tensors as they are: nothing is re-quantized. The scale is
found as a graph input of that name (torch.export lifts every buffer) or, under Dynamo, through
STORED_WEIGHTS: the checkpoint loader registers each stored weight with the module that holds it
(the scale is read from the module when compiling, so moving the model afterwards is fine) and the
activation_scale_ub the checkpoint was made with (kept unless the compile's config sets its own). The scheme
is the one registered with the weight (fxquant.json's plan), checked against the scale's shape; for
a weight registered without one (HF fbgemm_fp8 modules) the scale's shape names it: [N] or [N, 1]
per channel (fp8_rowwise, int8), [N / bn, K / bk] per block (fp8_blockwise), one element per
tensor (fp8_tensorwise). The config's skip list and scheme do not apply to such a layer: a
low-precision weight cannot run unquantized.
"""

from __future__ import annotations

from typing import NamedTuple

import weakref

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fxquant.passes.find_linears import LinearSite

STORED_DTYPES = {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}


class StoredWeight(NamedTuple):
    module: weakref.ref  # the module holding the weight and its scale
    scale_name: str  # the scale's attribute: "<weight attribute>_scale"
    activation_scale_ub: float | None  # FP8 only: the bound the checkpoint's activations were quantized with
    scheme: str | None = None  # the scheme it was stored with; None: named by the scale's shape

    @property
    def scale(self) -> Tensor | None:
        return getattr(self.module(), self.scale_name, None)


# weight → StoredWeight, for stored weights whose scale the graph does not reach: Dynamo only passes
# a backend the tensors forward() uses, and nn.Linear.forward never reads `weight_scale`.
STORED_WEIGHTS = WeakIdKeyDictionary()


def register_stored_weight(
    module: nn.Module, weight_name: str = "weight", activation_scale_ub: float | None = None, scheme: str | None = None
) -> None:
    """Tell fxquant that `module.<weight_name>` is stored quantized with `scheme` (None: named by the
    scale's shape), its scale in `module.<weight_name>_scale` (checkpoint loaders call this)."""
    STORED_WEIGHTS[getattr(module, weight_name)] = StoredWeight(
        weakref.ref(module), weight_name + "_scale", activation_scale_ub, scheme
    )


def stored_scale_name(site: LinearSite) -> str:
    """The qualified name of the scale that goes with a stored weight: "mlp.up.weight" → "mlp.up.weight_scale"."""
    return site.weight_name + "_scale"


# How each scheme's scale is laid out: the op takes per-channel scales as [N] and a tensorwise scale as [].
_SCALE_LAYOUTS = {"fp8_rowwise": "channel", "int8": "channel", "fp8_tensorwise": "tensor", "fp8_blockwise": "block"}
_WEIGHT_KINDS = {"fp8_rowwise": "fp8", "fp8_blockwise": "fp8", "fp8_tensorwise": "fp8", "int8": "int8"}


def op_scale_shape(scheme: str, shape: tuple[int, ...], n: int) -> list[int]:
    """The shape `scheme`'s op takes a stored scale of `shape` in ([N, 1] → [N], [1, 1] → [])."""
    return {"channel": [n], "tensor": []}.get(_SCALE_LAYOUTS[scheme], list(shape))


def _scale_fits(scheme: str, shape: tuple[int, ...], n: int, k: int) -> bool:
    layout = _SCALE_LAYOUTS[scheme]
    if layout == "channel":
        return shape in ((n,), (n, 1))
    if layout == "tensor":
        return len(shape) <= 2 and all(size == 1 for size in shape)
    return len(shape) == 2 and 0 < shape[0] <= n and 0 < shape[1] <= k and n % shape[0] == 0 and k % shape[1] == 0


def _shape_rule(kind: str, shape: tuple[int, ...], n: int, k: int) -> str | None:
    """The scheme a foreign checkpoint's scale shape names (per channel first: [1, 1] for N = 1 is rowwise)."""
    for scheme in ("int8", "fp8_rowwise", "fp8_tensorwise", "fp8_blockwise"):
        if _WEIGHT_KINDS[scheme] == kind and _scale_fits(scheme, shape, n, k):
            return scheme
    return None


def stored_scheme(site: LinearSite, scale: Tensor | None) -> tuple[str | None, str]:
    """(scheme, note) for a low-precision weight and its scale; scheme None when it cannot run.

    The scheme registered with the weight wins; the scale's shape only checks it."""
    kind = STORED_DTYPES.get(site.weight.dtype)
    if kind is None:
        return None, f"weight dtype {site.weight.dtype} unsupported"
    if site.weight_is_kn:
        return None, f"stored {site.weight.dtype} weight laid out [K, N]; want [N, K]"
    if scale is None or scale.dtype != torch.float32:
        return None, f"stored {site.weight.dtype} weight without a float32 {stored_scale_name(site)}"
    n, k, shape = site.out_features, site.in_features, tuple(scale.shape)
    declared = getattr(STORED_WEIGHTS.get(site.weight), "scheme", None)
    if declared is None:
        scheme = _shape_rule(kind, shape, n, k)
        if scheme is None:
            return None, f"stored weight [{n}, {k}] with a {list(shape)} scale: no scheme matches"
        return scheme, "stored quantized weights"
    if _WEIGHT_KINDS[declared] != kind or not _scale_fits(declared, shape, n, k):
        return None, f"stored as {declared}, but its weight is {site.weight.dtype} [{n}, {k}] with a {list(shape)} scale"
    return declared, "stored quantized weights"
