"""Plan: decide, for every linear layer found, its scheme or the reason it stays as it is.

Changes nothing in the graph. The plan prints as a table (layer, op, N x K, scheme, note), and
every rejection has a reason string: "skipped by skip list (lm_head)", "K=40 not divisible by 16".
A layer whose dtypes eager would reject (outside autocast) is an error naming it, as eager's is.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch._dynamo.utils import counters

from fxquant.config import QuantConfig
from fxquant.log import log_once
from fxquant.ops import LINEAR_SCHEMES
from fxquant.ops.availability import fp8_unsupported_reason
from fxquant.ops.linear_common import FLOAT_DTYPES
from fxquant.passes.find_linears import LinearSite, WeightLookup, fake_value, find_linears
from fxquant.passes.stored_weights import STORED_DTYPES, STORED_WEIGHTS, stored_scale_name, stored_scheme

if TYPE_CHECKING:
    from fxquant.passes.quantize_weights import QuantizedWeight


@dataclass
class PlannedLinear:
    """One linear layer and what fxquant does with it (scheme None: left unchanged)."""

    layer: str
    site: LinearSite = field(repr=False)
    scheme: str | None
    note: str = ""
    quantized: QuantizedWeight | None = field(default=None, repr=False)  # set by quantize_weights
    stored_scale: fx.Node | torch.Tensor | None = field(default=None, repr=False)  # scale of weights stored quantized
    activation_scale_ub: float | None = None  # what the layer's FP8 op bounds the per-token amax with
    merged_with: tuple[str, ...] = ()  # the layers it runs one GEMM with, itself included (plan_merges)
    fused: fx.Node | None = field(default=None, repr=False)  # the op node rewrite_linears made

    @property
    def shape(self) -> str:
        return f"{self.site.out_features} x {self.site.in_features}"


class Plan(list):
    """The PlannedLinear of one graph (or several, for a model with graph breaks), printable."""

    @property
    def rewritten(self) -> list[PlannedLinear]:
        return [entry for entry in self if entry.scheme is not None]

    @property
    def skipped(self) -> list[PlannedLinear]:
        return [entry for entry in self if entry.scheme is None]

    def __str__(self) -> str:
        header = ("layer", "op", "N x K", "scheme", "note")
        rows = [header] + [(e.layer, e.site.kind, e.shape, e.scheme or "-", e.note) for e in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.append(f"{len(self.rewritten)} of {len(self)} linear layers quantized")
        return "\n".join(lines)


def _module_path(stack_path: str) -> str:
    """Dynamo's "L['self'].layers[0].fc", or "L['args'][0].layers[0].fc" where the compiled frame is a
    `*args` wrapper's (dynamo_params.qualified_name; export's "layers.0.fc" passes through) → "layers.0.fc"."""
    path = re.sub(r"^L\['args'\]\[0\]|^[LG]\['[^']*'\]", "", stack_path)
    path = re.sub(r"\[(\d+)\]|\['([^']*)'\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.replace("._modules.", ".").strip(".")


def layer_name(site: LinearSite) -> str:
    """The module path of the nn.Linear that ran `site` ("layers.0.mlp.up_proj"), or for a bare
    parameter used in a matmul, the parameter's own path ("blocks.0.w")."""
    stack = site.node.meta.get("nn_module_stack") or {}
    if stack:
        path, module_type = list(stack.values())[-1]
        if _is_linear_type(module_type) and site.weight_name.endswith("weight"):
            return _module_path(path)
    return site.weight_name.removesuffix(".weight")


def _is_linear_type(module_type: type | str) -> bool:
    """nn_module_stack holds the class under Dynamo and its qualified name under torch.export."""
    if isinstance(module_type, str):
        module_name, _, class_name = module_type.rpartition(".")
        try:
            module_type = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            return False
    return isinstance(module_type, type) and issubclass(module_type, torch.nn.Linear)


def skip_reason(layer: str, site: LinearSite, config: QuantConfig) -> str | None:
    """Why `site` cannot be quantized under `config`, or None when it can."""
    for pattern in config.skip:
        if fnmatch.fnmatchcase(layer, pattern):
            return f"skipped by skip list ({pattern})"
    if site.weight.dtype not in FLOAT_DTYPES:
        return f"weight dtype {site.weight.dtype} unsupported"
    activation = fake_value(site.activation)
    if activation is None:
        return "activation shape unknown"
    if activation.dtype not in FLOAT_DTYPES:
        return f"activation dtype {activation.dtype} unsupported"
    if activation.device != site.weight.device:
        return f"activation on {activation.device}, weight on {site.weight.device}"
    n, k = site.out_features, site.in_features
    if n == 0 or k == 0:
        return "empty weight"
    if site.weight.numel() < config.min_weight_numel:
        return f"{site.weight.numel()} weights < min_weight_numel={config.min_weight_numel}"
    return LINEAR_SCHEMES[config.scheme].unsupported(layer, n, k, config)


def autocast_regions(gm: fx.GraphModule) -> dict[fx.Node, tuple[tuple[str, bool], ...]]:
    """For each node, the graph's own `torch.autocast` regions open where it runs (Dynamo's
    _enter_autocast / _exit_autocast nodes), outermost first, as (device type, enabled)."""
    regions, open_regions = {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.amp.autocast_mode._enter_autocast:
            open_regions[node] = (node.args[0], bool(node.args[2]))
        elif node.op == "call_function" and node.target is torch.amp.autocast_mode._exit_autocast:
            open_regions.pop(node.args[0], None)
        regions[node] = tuple(open_regions.values())
    return regions


def autocast_enabled(regions: tuple[tuple[str, bool], ...], device_type: str) -> bool:
    """Whether autocast is on for `device_type` inside `regions`: the innermost region's word, else the
    caller's state (Dynamo compiles under it and guards on it; an exported program follows its runner's)."""
    for region_device, enabled in reversed(regions):
        if region_device == device_type:
            return enabled
    return torch.is_autocast_enabled(device_type)


def check_eager_dtypes(layer: str, site: LinearSite, autocast: bool) -> None:
    """Eager's dtype rule for a layer fxquant rewrites: outside autocast, its activation, weight and
    bias share one dtype (eager raises otherwise; the op would silently run in the activation's)."""
    if autocast:
        return
    operands = {"activation": fake_value(site.activation), "weight": site.weight, "bias": fake_value(site.bias)}
    dtypes = {name: value.dtype for name, value in operands.items() if value is not None}
    if len(set(dtypes.values())) > 1:
        described = ", ".join(f"{name} {str(dtype).removeprefix('torch.')}" for name, dtype in dtypes.items())
        raise ValueError(
            f"fxquant: layer '{layer}': {described}; eager PyTorch raises here too (mat1 and mat2 must have the same "
            "dtype). Give the model inputs of its dtype, or run it under torch.autocast"
        )


def scheme_for(site: LinearSite, config: QuantConfig) -> tuple[str, str]:
    """The scheme this device can run, and a note when it differs from the one asked for."""
    if not LINEAR_SCHEMES[config.scheme].uses_fp8:
        return config.scheme, ""
    reason = fp8_unsupported_reason(site.weight.device)
    if reason is None:
        return config.scheme, ""
    log_once(logging.WARNING, f"fxquant: {reason}; falling back from {config.scheme} to int8")
    return "int8", f"{config.scheme} -> int8: {reason}"


def plan_linears(gm: fx.GraphModule, lookup: WeightLookup, config: QuantConfig) -> Plan:
    """Find every linear layer in `gm` and decide its scheme or why it is skipped."""
    plan = Plan()
    named_nodes = {found[0]: node for node in gm.graph.nodes if (found := lookup(node)) is not None}
    regions = autocast_regions(gm)
    for site in find_linears(gm, lookup):
        layer = layer_name(site)
        if site.weight.dtype in STORED_DTYPES:
            entry = _plan_stored(layer, site, named_nodes.get(stored_scale_name(site)), lookup, config)
        elif site.weight in STORED_WEIGHTS:
            raise ValueError(
                f"fxquant: layer '{layer}': its weight was loaded quantized but is now {site.weight.dtype}; the stored "
                "weights were cast (model.to(dtype)?). Move a loaded model with .to(device) only, or load it again"
            )
        elif (reason := skip_reason(layer, site, config)) is None:
            check_eager_dtypes(layer, site, autocast_enabled(regions[site.node], site.weight.device.type))
            entry = PlannedLinear(layer, site, *scheme_for(site, config), activation_scale_ub=config.activation_scale_ub)
        else:
            entry = PlannedLinear(layer, site, None, reason)
        counters["fxquant"]["skipped"] += entry.scheme is None
        plan.append(entry)
    return plan


def _plan_stored(
    layer: str, site: LinearSite, scale_node: fx.Node | None, lookup: WeightLookup, config: QuantConfig
) -> PlannedLinear:
    """A layer whose weight is already quantized: its scheme comes from the stored tensors, not the
    config; its activation_scale_ub is the config's, else the one registered with the weight."""
    registered = STORED_WEIGHTS.get(site.weight)
    scale = lookup(scale_node)[1] if scale_node is not None else getattr(registered, "scale", None)
    scheme, note = stored_scheme(site, scale)
    if scheme is None:
        raise ValueError(f"fxquant: layer '{layer}': {note}; it cannot run unquantized either")
    ub = config.activation_scale_ub
    if ub is None and registered is not None and registered.activation_scale_ub is not None and scheme != "int8":
        ub = registered.activation_scale_ub
        note += f" (activation_scale_ub {ub:g} from the checkpoint)"
    return PlannedLinear(layer, site, scheme, note, stored_scale=scale_node if scale_node is not None else scale,
                         activation_scale_ub=None if scheme == "int8" else ub)
