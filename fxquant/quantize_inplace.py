"""`fxquant.quantize_`: quantize a model's linear layers in place, one layer at a time.

    plan = fxquant.quantize_(model)                       # nn.Linear / Conv1D weights → e4m3 + weight_scale
    model(x)                                              # eager: fxquant's ops (fxquant/stored_layers.py)
    torch.compile(model, backend="fxquant")(x)            # runs the stored weights, quantizes nothing again

Each planned layer ends as `load_quantized` leaves a layer of a checkpoint: `weight` the scheme's
low-precision weight ([N, K], a Conv1D's too), its other tensors buffers (`weight_scale`, in the
checkpoint file's layout), registered as stored with its scheme and options, its class the Stored
subclass of its own. The float weight is dropped as soon as its layer is done, so memory holds at
most one extra float layer, on the CPU or the GPU alike.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fxquant.checkpoint_metadata import check_config
from fxquant.checkpoint_layers import file_tensors, plan_modules
from fxquant.config import QuantConfig
from fxquant.log import logger
from fxquant.passes import Plan
from fxquant.passes.plan_linears import PlannedLinear, with_fallback
from fxquant.passes.quantize_weights import quantize_parameter
from fxquant.stored_layers import make_stored


def quantize_(model: nn.Module, config: QuantConfig | None = None) -> Plan:
    """Quantize `model`'s nn.Linear and Conv1D layers in place under `config` (rules, skip list,
    scheme; the scheme's fallback on each weight's device) and return the plan.

    Layers already stored quantized stay as they are. A weight shared by several planned layers of
    one scheme is quantized once and shared; a weight a layer shares with a module that is not a
    planned layer (tied embeddings with an unskipped lm_head) is quantized for the layer, and the
    other module keeps the float weight, so its memory is not freed (logged). GEMM sites that only
    a trace finds (a matmul on a bare parameter, expert weights) are not modules: they keep their
    float weight here, and `torch.compile(model, backend="fxquant")` quantizes them at compile
    time as it does for any model. Refuses before changing anything: weights on the meta device, a
    scheme whose tensors a graph folds (static fp8_tensorwise).
    """
    config = config or QuantConfig()
    check_config(config)
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ValueError(f"fxquant: cannot quantize weights on the meta device ({', '.join(on_meta[:5])}); load them first")
    plan = Plan(
        with_fallback(entry, entry.site.weight.device, config) if entry.scheme is not None and entry.stored is None else entry
        for entry in plan_modules(model, config)
    )
    users = _weight_users(model)
    done: dict[tuple, tuple[nn.Parameter, dict[str, torch.Tensor]]] = {}
    for entry in plan.rewritten:
        if entry.stored is None:
            _quantize_layer(model, entry, users, done)
    return plan


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
    make_stored(module, entry.scheme, entry.options)
