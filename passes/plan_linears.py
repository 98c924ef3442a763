"""Plan: decide, for every GEMM site found (linear layers, expert weights), its scheme or the reason it
stays as it is.

Changes nothing in the graph. A float layer's scheme is the config's word on it (the first
matching QuantConfig.rules glob, else the skip list, else `scheme`), checked by the scheme's shape
rule and its site kinds (a scheme without a batched or grouped form leaves expert weights as they
are), then replaced by the scheme's fallback where the device cannot run it; a stored layer's is
the one it was stored with. A router (a linear site whose output picks experts through topk) stays
as it is unless a rule names it. The indexed sites of one expert weight (W[e] for each expert a
loop reaches) are one row, decided and quantized once for the whole [E, N, K] parameter. The plan prints as a table (layer, op, [E x] N x K, scheme, note): every
rejection has a reason string ("skipped by skip list (lm_head)", "K=40 not divisible by 16") and a
row a rule decided names it ("rule '*.down_proj'").
A layer whose dtypes eager would reject (outside autocast) is an error naming it, as eager's is.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch._dynamo.utils import counters

from fxquant.config import QuantConfig
from fxquant.footprint import nbytes, readable
from fxquant.ops.linear_common import FLOAT_DTYPES
from fxquant.passes.find_sites import GemmSite, WeightLookup, fake_value, find_sites
from fxquant.passes.stored_weights import STORED_WEIGHTS, is_stored, stored_scheme, stored_tensor_name
from fxquant.scheme import SchemeCall, get_scheme
from fxquant.tensor_parallel import is_dtensor, shard_note, shard_problem

if TYPE_CHECKING:
    from fxquant.passes.quantize_weights import QuantizedWeight


@dataclass
class PlannedLinear:
    """One linear layer and what fxquant does with it (scheme None: left unchanged)."""

    layer: str
    site: GemmSite = field(repr=False)
    scheme: str | None
    note: str = ""
    options: object = None  # the scheme's Options this layer runs with
    rule: str | None = None  # the glob of the QuantConfig.rules entry that decided the layer, if one did
    quantized: QuantizedWeight | None = field(default=None, repr=False)  # set by quantize_weights
    # weights stored quantized: the scheme's tensors other than "weight" (graph inputs, or the module's buffers)
    stored: dict[str, fx.Node | torch.Tensor] | None = field(default=None, repr=False)
    merged_with: tuple[str, ...] = ()  # the layers it runs one GEMM with, itself included (plan_merges)
    # indexed sites: the other uses W[e'] of the same expert weight in the graph, rewritten alike
    more_sites: tuple[GemmSite, ...] = field(default=(), repr=False)
    fused: fx.Node | None = field(default=None, repr=False)  # the op node rewrite_linears (or merge) made
    call: SchemeCall | None = field(default=None, repr=False)  # how `fused` was built, by name
    # stored weights merged: the views of the stacked buffers their module tensors move into once the
    # graph is compiled (merge_parallel_linears.hold_stored_in_stacks)
    stacked_views: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def sites(self) -> tuple[GemmSite, ...]:
        """Every site the row covers: `site`, and for indexed sites the other experts' uses."""
        return (self.site, *self.more_sites)

    @property
    def bytes_before(self) -> int:
        """Bytes of the weight as the model holds it (a stored layer's: as stored)."""
        if self.stored is not None:
            return self.bytes_after
        return nbytes(self.site.weight.dtype, self.site.weight.shape)

    @property
    def bytes_after(self) -> int:
        """Bytes of the weight as fxquant runs it: its scheme's tensors (the float weight where skipped)."""
        site = self.site
        if self.scheme is None:
            return nbytes(site.weight.dtype, site.weight.shape)
        if self.stored is not None:
            values = [fake_value(t) if isinstance(t, fx.Node) else t for t in self.stored.values()]
            return sum(nbytes(t.dtype, t.shape) for t in [site.weight, *values])
        meta = torch.empty((*site.weight.shape[:-2], site.out_features, site.in_features), device="meta")
        return sum(nbytes(t.dtype, t.shape) for t in get_scheme(self.scheme).quantize(meta, self.options).values())

    @property
    def shape(self) -> str:
        """"N x K", or "E x N x K" for expert weights."""
        experts = "" if self.site.experts is None else f"{self.site.experts} x "
        return f"{experts}{self.site.out_features} x {self.site.in_features}"


class Plan(list):
    """The PlannedLinear of one graph (or several, for a model with graph breaks), printable."""

    # A checkpoint's plan: the model class's `_keep_in_fp32_modules` (T5's "wo"), which transformers'
    # quantizers leave float when they load it (fxquant/hf_formats.py's layouts account for them)
    float32_modules: tuple[str, ...] = ()

    @property
    def rewritten(self) -> list[PlannedLinear]:
        return [entry for entry in self if entry.scheme is not None]

    @property
    def skipped(self) -> list[PlannedLinear]:
        return [entry for entry in self if entry.scheme is None]

    def __str__(self) -> str:
        return format_plan([(e.layer, e.site.op, e.shape, e.scheme, e.note, e.site.kind, e.bytes_before, e.bytes_after)
                            for e in self])


def format_plan(rows: list[tuple[str, str, str, str | None, str, str, int, int]]) -> str:
    """The plan table of (layer, op, shape, scheme or None, note, site kind, bytes before, bytes after)
    rows, its total of weight bytes and its count line."""
    experts = [row for row in rows if row[5] != "linear"]
    header = ("layer", "op", "(E x) N x K" if experts else "N x K", "scheme", "bytes", "note")
    cells = [header] + [
        (layer, op, shape, scheme or "-", readable(before) if before == after else f"{readable(before)} -> {readable(after)}", note)
        for layer, op, shape, scheme, note, _, before, after in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    before, after = sum(row[6] for row in rows), sum(row[7] for row in rows)
    if rows:
        lines.append(f"weights of these layers: {readable(before)} -> {readable(after)} ({after / max(before, 1):.2f}x)")
    linears = [row for row in rows if row[5] == "linear"]
    count = f"{sum(row[3] is not None for row in linears)} of {len(linears)} linear layers"
    if experts:
        count += f" and {sum(row[3] is not None for row in experts)} of {len(experts)} expert weights"
    lines.append(f"{count} quantized")
    return "\n".join(lines)


def _module_path(stack_path: str) -> str:
    """Dynamo's "L['self'].layers[0].fc", or "L['args'][0].layers[0].fc" where the compiled frame is a
    `*args` wrapper's (dynamo_params.qualified_name; export's "layers.0.fc" passes through) → "layers.0.fc"."""
    path = re.sub(r"^L\['args'\]\[0\]|^[LG]\['[^']*'\]", "", stack_path)
    path = re.sub(r"\[(\d+)\]|\['([^']*)'\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.replace("._modules.", ".").strip(".")


def layer_name(site: GemmSite) -> str:
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


def skip_reason(layer: str, site: GemmSite, config: QuantConfig, scheme: str) -> str | None:
    """Why `site` cannot be quantized with `scheme` under `config`, or None when it can."""
    if site.weight.dtype not in FLOAT_DTYPES or site.operand_dtype not in FLOAT_DTYPES:
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
    options = config.options_for(scheme)
    return (kind_unsupported(site, scheme) or get_scheme(scheme).unsupported(layer, n, k, options)
            or (shard_problem(site.weight, site.weight_is_kn, layer, get_scheme(scheme), options) if is_dtensor(site.weight) else None))


def kind_unsupported(site: GemmSite, scheme: str) -> str | None:
    """Why `scheme` cannot run a site of this kind, or None. An indexed site W[e] runs the scheme's
    linear op on its per-expert tensors indexed at e: any scheme with an expert form has them (its
    `quantize` takes [E, N, K] and stacks its tensors by expert along dim 0)."""
    kinds = get_scheme(scheme).site_kinds()
    if site.kind in kinds or (site.kind == "indexed" and kinds & {"batched", "grouped"}):
        return None
    if site.kind == "indexed":
        return f"{scheme} has no expert form (batched or grouped) for expert weights"
    return f"{scheme} has no {site.kind} form for expert weights"


# How far (in nodes, not through another GEMM) a router's output may be from the topk that picks experts.
ROUTER_HOPS = 6
TOPK = {torch.topk, torch.ops.aten.topk.default}
GEMM_TARGETS = {"linear", "matmul", "mm", "bmm", "addmm", "_grouped_mm", "grouped_mm"}


def routes_experts(site: GemmSite) -> bool:
    """Whether `site` is an MoE router: its output reaches a topk (the experts' choice) within a few
    nodes, through no other GEMM (Qwen3-MoE, Mixtral: softmax then topk; DeepSeek-V3: sigmoid, a
    bias, grouped topk; gpt-oss: topk of the logits)."""
    frontier, seen = [site.node], {site.node}
    for _ in range(ROUTER_HOPS):
        frontier = [user for node in frontier for user in node.users if user not in seen]
        seen.update(frontier)
        if any(node.target in TOPK or (node.op == "call_method" and node.target == "topk") for node in frontier):
            return True
        frontier = [node for node in frontier if _target_name(node) not in GEMM_TARGETS]
    return False


def _target_name(node: fx.Node) -> str:
    """"linear" for F.linear, aten.linear.default and a "linear" method alike."""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


ROUTER_NOTE = "router: its output picks the experts (topk); quantize it with a rule"


def decide(layer: str, site: GemmSite, config: QuantConfig, device: torch.device | None = None) -> PlannedLinear:
    """The plan entry of a float layer: its rule, skip entry or the config's scheme, or why it stays as it is;
    "auto" resolved for `device` (None: for a checkpoint, fxquant/config.py's auto_scheme)."""
    decision = config.decide(layer, device)
    rule = decision.pattern if decision.source == "rules" else None
    if decision.scheme is None:
        return PlannedLinear(layer, site, None, decision.note, rule=rule)
    if rule is None and site.kind == "linear" and routes_experts(site):
        return PlannedLinear(layer, site, None, ROUTER_NOTE)
    reason = skip_reason(layer, site, config, decision.scheme)
    if reason is not None:  # what "auto" chose does not matter to a layer left as it is
        return PlannedLinear(layer, site, None, "; ".join(filter(None, [decision._replace(auto=None).note, reason])), rule=rule)
    return PlannedLinear(layer, site, decision.scheme, decision.note, config.options_for(decision.scheme), rule=rule)


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


def check_eager_dtypes(layer: str, site: GemmSite, autocast: bool) -> None:
    """Eager's dtype rule for a layer fxquant rewrites: outside autocast, its activation, weight and
    bias share one dtype (eager raises otherwise; the op would silently run in the activation's)."""
    if autocast:
        return
    operands = {"activation": fake_value(site.activation), "weight": site.weight, "bias": fake_value(site.bias)}
    dtypes = {name: value.dtype for name, value in operands.items() if value is not None}
    dtypes["weight"] = site.operand_dtype
    if len(set(dtypes.values())) > 1:
        described = ", ".join(f"{name} {str(dtype).removeprefix('torch.')}" for name, dtype in dtypes.items())
        raise ValueError(
            f"fxquant: layer '{layer}': {described}; eager PyTorch raises here too (mat1 and mat2 must have the same "
            "dtype). Give the model inputs of its dtype, or run it under torch.autocast"
        )


def with_fallback(entry: PlannedLinear, device: torch.device, config: QuantConfig) -> PlannedLinear:
    """`entry` with the scheme its scheme falls back to where it cannot run on `device` (noted)."""
    fallback = get_scheme(entry.scheme).fallback(device)
    if fallback is None:
        return entry
    scheme, reason = fallback
    note = "; ".join(filter(None, [entry.note, f"{entry.scheme} -> {scheme}: {reason}"]))
    cannot = kind_unsupported(entry.site, scheme)
    if cannot is not None:
        return dataclasses.replace(entry, scheme=None, note=f"{note}; {cannot}", options=None)
    return dataclasses.replace(entry, scheme=scheme, note=note, options=config.options_for(scheme))


def plan_linears(gm: fx.GraphModule, lookup: WeightLookup, config: QuantConfig) -> Plan:
    """Find every GEMM site in `gm` and decide its scheme or why it is skipped."""
    plan = Plan()
    named_nodes = {found[0]: node for node in gm.graph.nodes if (found := lookup(node)) is not None}
    regions = autocast_regions(gm)
    indexed: dict[tuple[str, bool], PlannedLinear] = {}  # one row per expert weight for its W[e] sites
    for site in find_sites(gm, lookup):
        layer = layer_name(site)
        first = indexed.get((site.weight_name, site.weight_is_kn)) if site.kind == "indexed" else None
        if first is not None:
            first.more_sites = (*first.more_sites, site)
            if first.scheme is not None:
                check_eager_dtypes(layer, site, autocast_enabled(regions[site.node], site.weight.device.type))
            continue
        if is_stored(site.weight):
            entry = _plan_stored(layer, site, named_nodes, lookup, config)
        elif site.weight in STORED_WEIGHTS:
            raise ValueError(
                f"fxquant: layer '{layer}': its weight was loaded quantized but is now {site.weight.dtype}; the stored "
                "weights were cast (model.to(dtype)?). Move a loaded model with .to(device) only, or load it again"
            )
        else:
            entry = decide(layer, site, config, site.weight.device)
            if entry.scheme is not None:
                check_eager_dtypes(layer, site, autocast_enabled(regions[site.node], site.weight.device.type))
                entry = with_fallback(entry, site.weight.device, config)
        if is_dtensor(site.weight):
            entry = dataclasses.replace(entry, note="; ".join(filter(None, [entry.note, shard_note(site.weight, site.weight_is_kn)])))
        counters["fxquant"]["skipped"] += entry.scheme is None
        plan.append(entry)
        if site.kind == "indexed":
            indexed[site.weight_name, site.weight_is_kn] = entry
    return plan


def _plan_stored(
    layer: str, site: GemmSite, named_nodes: dict[str, fx.Node], lookup: WeightLookup, config: QuantConfig
) -> PlannedLinear:
    """A layer whose weight is already quantized: its scheme and tensors are the stored ones, not the
    config's; each option the config does not set (QuantConfig.given_options) is the one registered
    with the weight (a loaded llm_int8 layer keeps its checkpoint's threshold)."""
    scheme, tensors, note = stored_scheme(site, lambda name: lookup(named_nodes[name])[1] if name in named_nodes else None)
    if scheme is None:
        raise ValueError(f"fxquant: layer '{layer}': {note}; it cannot run unquantized either")
    nodes = {name: named_nodes.get(stored_tensor_name(site, name), tensor) for name, tensor in tensors.items()}
    options = config.options_for(scheme)
    registered = getattr(STORED_WEIGHTS.get(site.weight), "options", None)
    if registered is not None:
        given = config.given_options(scheme)
        unset = {f.name: getattr(registered, f.name) for f in dataclasses.fields(options)
                 if f.name not in given and getattr(registered, f.name) != getattr(options, f.name)}
        options = dataclasses.replace(options, **unset)
        note += "".join(f" ({name} {value:g} from the checkpoint)" if isinstance(value, float)
                        else f" ({name} {value} from the checkpoint)" for name, value in unset.items())
    return PlannedLinear(layer, site, scheme, note, options, stored=nodes)
