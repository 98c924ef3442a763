"""Recognize linear layers whose weights are already quantized (a loaded checkpoint).

A layer stored the way HF transformers' `fbgemm_fp8` and fxquant's checkpoints store it,
    <layer>.weight        e4m3 or int8 [N, K]       <layer>.weight_scale   float32
runs through fxquant's op with those tensors as they are: nothing is re-quantized. The scale is
found as a graph input of that name (torch.export lifts every buffer) or, under Dynamo, through
STORED_WEIGHTS: the checkpoint loader registers each stored weight with the module that holds it
(the scale is read from the module when compiling, so moving the model afterwards is fine) and the
activation_scale_ub the checkpoint was made with (kept unless the compile's config sets its own). The scale's
shape names the scheme: [N] or [N, 1] per channel (fp8_rowwise, int8), [N / bn, K / bk] per
block (fp8_blockwise), one element per tensor (fp8_tensorwise). The config's skip list and scheme
do not apply to such a layer: a low-precision weight cannot run unquantized.
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

    @property
    def scale(self) -> Tensor | None:
        return getattr(self.module(), self.scale_name, None)


# weight → StoredWeight, for stored weights whose scale the graph does not reach: Dynamo only passes
# a backend the tensors forward() uses, and nn.Linear.forward never reads `weight_scale`.
STORED_WEIGHTS = WeakIdKeyDictionary()


def register_stored_weight(module: nn.Module, weight_name: str = "weight", activation_scale_ub: float | None = None) -> None:
    """Tell fxquant that `module.<weight_name>` is stored quantized, its scale in
    `module.<weight_name>_scale` (checkpoint loaders call this)."""
    STORED_WEIGHTS[getattr(module, weight_name)] = StoredWeight(weakref.ref(module), weight_name + "_scale", activation_scale_ub)


def stored_scale_name(site: LinearSite) -> str:
    """The qualified name of the scale that goes with a stored weight: "mlp.up.weight" → "mlp.up.weight_scale"."""
    return site.weight_name + "_scale"


def stored_scheme(site: LinearSite, scale: Tensor | None) -> tuple[str | None, str]:
    """(scheme, note) for a low-precision weight and its scale; scheme None when it cannot run."""
    kind = STORED_DTYPES.get(site.weight.dtype)
    if kind is None:
        return None, f"weight dtype {site.weight.dtype} unsupported"
    if site.weight_is_kn:
        return None, f"stored {site.weight.dtype} weight laid out [K, N]; want [N, K]"
    if scale is None or scale.dtype != torch.float32:
        return None, f"stored {site.weight.dtype} weight without a float32 {stored_scale_name(site)}"
    n, k = site.out_features, site.in_features
    if tuple(scale.shape) in ((n,), (n, 1)):
        return ("fp8_rowwise" if kind == "fp8" else "int8"), "stored quantized weights"
    if kind == "fp8" and scale.numel() == 1:
        return "fp8_tensorwise", "stored quantized weights"
    if kind == "fp8" and scale.dim() == 2 and n % scale.shape[0] == 0 and k % scale.shape[1] == 0:
        return "fp8_blockwise", "stored quantized weights"
    return None, f"stored weight [{n}, {k}] with a {list(scale.shape)} scale: no scheme matches"
