"""`fxquant.quantize_`: quantize a model's linear layers in place, one layer at a time.

    plan = fxquant.quantize_(model)                       # nn.Linear / Conv1D weights → e4m3 + weight_scale
    model(x)                                              # eager: fxquant's ops (fxquant/stored_layers.py)
    torch.compile(model, backend="fxquant")(x)            # runs the stored weights, quantizes nothing again

Each planned layer ends as `load_quantized` leaves a layer of a checkpoint: `weight` the scheme's
low-precision weight ([N, K], a Conv1D's too), its other tensors buffers (`weight_scale`, in the
checkpoint file's layout), registered as stored with its scheme and options, its class the Stored
subclass of its own. The float weight is dropped as soon as its layer is done, so memory holds at
most one extra float layer, on the CPU or the GPU alike.

The 3-D expert weights of transformers MoE models (`experts.gate_up_proj`, `experts.down_proj`)
are planned one row per tensor, by the same rules, as the expert site their
`experts_implementation` makes (batched_mm: batched, grouped_mm: grouped), and stored [E, N, K]
with the scheme's other tensors in the op's layout (fxquant/stored_experts.py); they are quantized
expert by expert, so the extra memory is one expert's float tensors. transformers' `eager`
implementation runs its loop outside any compiled graph, where only float weights run: its
experts stay float, with the reason.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.checkpoint_metadata import check_config
from fxquant.checkpoint_layers import file_tensors, plan_modules
from fxquant.config import QuantConfig
from fxquant.log import logger
from fxquant.passes import Plan
from fxquant.plan_summary import PlanSummary
from fxquant.passes.find_sites import GemmSite
from fxquant.passes.stored_weights import STORED_WEIGHTS, is_stored
from fxquant.passes.plan_linears import PlannedLinear, decide, with_fallback
from fxquant.passes.quantize_weights import quantize_parameter
from fxquant.scheme import get_scheme
from fxquant.stored_experts import StoredExperts, make_stored_experts
from fxquant.stored_layers import make_stored

# transformers' experts implementations fxquant reads, and the expert site kind each makes.
EXPERT_KINDS = {"batched_mm": "batched", "grouped_mm": "grouped", "eager": "indexed"}
EAGER_NOTE = ("experts_implementation 'eager' runs its loop outside compiled graphs; "
              "set 'batched_mm' or 'grouped_mm' to quantize these experts in place")


def quantize_(model: nn.Module, config: QuantConfig | None = None) -> PlanSummary:
    """Quantize `model`'s nn.Linear and Conv1D layers in place under `config` (rules, skip list,
    scheme; the scheme's fallback on each weight's device) and return the plan (its rows: it holds
    no weight).

    Layers already stored quantized stay as they are. A weight shared by several planned layers of
    one scheme is quantized once and shared; a weight a layer shares with a module that is not a
    planned layer (tied embeddings with an unskipped lm_head) is quantized for the layer, and the
    other module keeps the float weight, so its memory is not freed (logged). The 3-D expert
    weights of transformers MoE models are quantized too (module docstring). GEMM sites that only a
    trace finds (a matmul on a bare parameter) are not modules: they keep their float weight here,
    and `torch.compile(model, backend="fxquant")` quantizes them at compile time as it does for any
    model. Refuses before changing anything: weights on the meta device, a scheme whose tensors a
    graph folds (static fp8_tensorwise).
    """
    config = config or QuantConfig()
    check_config(config)
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ValueError(f"fxquant: cannot quantize weights on the meta device ({', '.join(on_meta[:5])}); load them first")
    plan = Plan(
        with_fallback(entry, entry.site.weight.device, config) if entry.scheme is not None and entry.stored is None else entry
        for entry in [*plan_modules(model, config), *plan_experts(model, config)]
    )
    summary = PlanSummary(plan)
    pending = _by_module(plan.rewritten)
    del plan  # its sites hold the float weights: each goes as soon as its module is done
    users = _weight_users(model)
    done: dict[tuple, tuple[nn.Parameter, dict[str, torch.Tensor]]] = {}
    while pending:
        entries = pending.pop(0)
        if entries[0].site.kind != "linear":
            fresh = [entry for entry in entries if entry.stored is None]
            if fresh:
                _quantize_experts(model.get_submodule(entries[0].layer.rpartition(".")[0]), fresh)
        elif entries[0].stored is None:
            _quantize_layer(model, entries[0], users, done)
        del entries
    return summary


def _by_module(entries: list[PlannedLinear]) -> list[list[PlannedLinear]]:
    """The planned entries, each layer alone and an Experts module's weights together, in plan order."""
    groups: dict[str, list[PlannedLinear]] = {}
    for entry in entries:
        key = entry.layer.rpartition(".")[0] if entry.site.kind != "linear" else entry.layer
        groups.setdefault(key, []).append(entry)
    return list(groups.values())


def _weight_users(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) → every module path whose `weight` (or other attribute) it is."""
    users: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        users.setdefault(id(parameter), []).append(name.rpartition(".")[0])
    return users


def _quantize_layer(model: nn.Module, entry: PlannedLinear, users: dict[int, list[str]], done: dict) -> None:
    module, site = model.get_submodule(entry.layer), entry.site
    key = (id(site.weight), entry.scheme, entry.options)
    if key not in done:
        with torch.no_grad():
            quantized = quantize_parameter(entry.layer, site.weight, site.weight_is_kn, entry.scheme, entry.options)
        stored = file_tensors(entry.scheme, quantized, conv1d=False)  # the op's [N, K] weight, the file's other tensors
        done[key] = (nn.Parameter(stored.pop("weight"), requires_grad=False), stored)
        others = [user for user in users.get(id(site.weight), []) if user != entry.layer]
        if others:
            logger.log(logging.INFO, "fxquant: %s's weight is also used by %s: quantized for %s, kept in float there",
                       entry.layer, ", ".join(others), entry.layer)
    weight, tensors = done[key]
    module.weight = weight
    for name, tensor in tensors.items():
        module.register_buffer(name, tensor)
    make_stored(module, entry.scheme, entry.options, entry.layer)


def _is_experts(module: nn.Module) -> bool:
    """A transformers Experts module (`use_experts_implementation`): 3-D weights run by its implementation."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(getattr(module, "config", None), "_experts_implementation")


def _expert_site(name: str, weight: torch.Tensor, kind: str, op: str, weight_is_kn: bool) -> GemmSite:
    """An expert weight [E, N, K] ([E, K, N]: `weight_is_kn`) as a site of `kind`, on an activation of
    its dtype and device, so that the plan pass's `skip_reason` judges it."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(0, weight.shape[-2 if weight_is_kn else -1], dtype=weight.dtype, device=weight.device)
    node = graph.call_function(F.linear, (x, graph.get_attr("weight")))
    return GemmSite(node, kind, op, name, weight, weight_is_kn, view_node=None)


def plan_experts(model: nn.Module, config: QuantConfig) -> Plan:
    """One row per 3-D expert weight of every transformers Experts module, by the plan pass's rules."""
    plan = Plan()
    for name, module in model.named_modules():
        if not _is_experts(module):
            continue
        implementation = module.config._experts_implementation
        for attr, weight in module.named_parameters(prefix=name, recurse=False):
            kind = EXPERT_KINDS.get(implementation, "grouped")
            if isinstance(module, StoredExperts) and is_stored(weight):  # kept as it is
                stored = STORED_WEIGHTS[weight]
                site = _expert_site(attr, weight, kind, str(implementation), False)
                plan.append(PlannedLinear(attr, site, stored.scheme, "stored quantized weights", stored.options, stored=stored.tensors()))
                continue
            if weight.dim() != 3 or not weight.is_floating_point():
                continue
            site = _expert_site(attr, weight, kind, str(implementation), module.is_transposed)
            if isinstance(module, StoredExperts):
                plan.append(PlannedLinear(attr, site, None, "its module's other expert weights are stored: quantize them in one call"))
            elif implementation not in EXPERT_KINDS:
                plan.append(PlannedLinear(attr, site, None, f"experts_implementation {implementation!r} is not read by fxquant"))
            elif implementation == "eager":
                plan.append(PlannedLinear(attr, site, None, EAGER_NOTE))
            else:
                plan.append(decide(attr, site, config))
    return plan


def _quantize_experts(module: nn.Module, entries: list[PlannedLinear]) -> None:
    """Store each planned expert weight of `module` as its scheme's [E, N, K] tensors, quantized expert by
    expert into tensors made once, and make the module run them."""
    stored = {}
    for entry in entries:
        attr, site = entry.layer.rpartition(".")[2], entry.site
        e, n, k = site.weight.shape[0], site.out_features, site.in_features
        layout = get_scheme(entry.scheme).quantize(torch.empty(e, n, k, device="meta"), entry.options)
        tensors = {name: torch.empty(t.shape, dtype=t.dtype, device=site.weight.device) for name, t in layout.items()}
        for expert in range(e):
            with torch.no_grad():
                part = quantize_parameter(entry.layer, site.weight[expert : expert + 1], site.weight_is_kn, entry.scheme, entry.options)
            for name, tensor in part.items():
                tensors[name][expert : expert + 1].copy_(tensor)
        stored[attr] = (site.weight.dtype, entry.scheme, entry.options)
        module._parameters[attr] = nn.Parameter(tensors.pop("weight"), requires_grad=False)
        for name, tensor in tensors.items():
            module.register_buffer(attr + name.removeprefix("weight"), tensor)
    make_stored_experts(module, stored)
