"""Which layers a checkpoint stores quantized, and in what layout: nn.Linear and transformers' Conv1D.

    nn.Linear  weight [N, K]  →  <layer>.weight  e4m3 / int8 [N, K]    <layer>.weight_scale  float32  (<layer>.weight_<...>)
    Conv1D     weight [K, N]  →  <layer>.weight  e4m3 / int8 [K, N]    <layer>.weight_scale  float32
Each layer holds its scheme's tensors (fxquant/scheme.py) in the scheme's file layout (the built-ins'
scales in the GEMM's orientation for both: [N, 1] per channel, [N/bn, K/bk] per block, [] per
tensor). A Conv1D's quantized weight keeps its module's [K, N] layout in the file, as GPT-2's float
checkpoints hold it and as vLLM's GPT-2 loader reads it (it transposes every c_attn / c_proj / c_fc
weight); loaded, it is held [N, K], the op's layout (fxquant/stored_layers.py). A packed weight
(nf4 / fp4: [N, K / 2], `Scheme.packed_weight`) is held as the op takes it in the file too.

The plan walks modules, not a trace: a parameter multiplied outside these modules (`x @ W.t()` on a
raw nn.Parameter) is listed unquantized with the reason. A layer already stored quantized (a model
from `load_quantized`) is kept as stored, and must agree with the config the checkpoint is written with.
A layer the model class keeps in float32 (transformers' `_keep_in_fp32_modules`: T5's `wo`) stays
float, as every transformers quantizer leaves it: T5's forward casts its input to that weight's dtype,
and transformers would load a quantized one as a float Linear.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fxquant.config import QuantConfig
from fxquant.hf_formats import not_converted
from fxquant.passes.find_sites import GemmSite
from fxquant.passes.plan_linears import Plan, PlannedLinear, decide
from fxquant.passes.stored_weights import STORED_WEIGHTS, is_stored, stored_scheme
from fxquant.scheme import get_scheme
from fxquant.stored_layers import conv1d_type

STORED_NOTE = "stored quantized weights"
RAW_PARAMETER_NOTE = ("a parameter outside nn.Linear / Conv1D: checkpoints store it as it is (compiling quantizes it "
                      "where it is a GEMM weight, unless it is an MoE router)")


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_checkpoint_layer(module: nn.Module) -> bool:
    """nn.Linear or Conv1D: the layers a checkpoint can hold quantized."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _site(name: str, weight: Tensor, op: str, weight_is_kn: bool) -> GemmSite:
    """`weight` as the one-node graph `F.linear(x, weight)`, `addmm(b, x, weight)` or `x @ weight` (by
    `op`), x of the weight's dtype and device, so that the plan pass's `skip_reason` judges it."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    in_features = weight.shape[0] if weight_is_kn else weight.shape[-1]
    x.meta["val"] = torch.empty(0, in_features, dtype=weight.dtype, device=weight.device)
    bias = graph.placeholder("bias")
    w = graph.get_attr("weight")
    calls = {"linear": (F.linear, (x, w)), "addmm": (torch.addmm, (bias, x, w)), "matmul": (torch.matmul, (x, w))}
    node = graph.call_function(*calls[op])
    return GemmSite(node, "linear", op, name, weight, weight_is_kn=weight_is_kn, view_node=None)


def layer_site(name: str, module: nn.Module) -> GemmSite:
    """A checkpoint layer as a GemmSite: a Conv1D's float weight is [K, N], its stored one [N, K]."""
    weight = module.weight
    conv1d = is_conv1d(module)
    kn = conv1d and not is_stored(weight)
    return _site(f"{name}.weight" if name else "weight", weight, "addmm" if conv1d else "linear", kn)


def planned_shape(entry: PlannedLinear) -> tuple[int, int]:
    """[N, K] of a planned layer: its site's, whose weight a stored nf4 / fp4 layer holds as [N, K / 2]
    bytes (`Scheme.packed_weight`)."""
    n, k = entry.site.out_features, entry.site.in_features
    packed = entry.stored is not None and entry.scheme is not None and get_scheme(entry.scheme).packed_weight
    return n, 2 * k if packed else k


def stored_layout(scheme: str, n: int, k: int, options: object, conv1d: bool) -> dict[str, tuple[torch.dtype, tuple]]:
    """{name: (dtype, shape)} of the tensors an [N, K] layer stored with `scheme` holds, as the file holds them."""
    plugin = get_scheme(scheme)
    layout = {name: (dtype, plugin.file_shape(name, shape)) for name, (dtype, shape) in plugin.layout(n, k, options).items()}
    if weight_transposed_in_file(scheme, conv1d):
        layout["weight"] = (layout["weight"][0], (k, n))
    return layout


def file_tensors(scheme: str, tensors: dict[str, Tensor], conv1d: bool) -> dict[str, Tensor]:
    """A layer's quantized tensors (the op's layout) as the file holds them, by name."""
    plugin = get_scheme(scheme)
    stored = {name: t.reshape(plugin.file_shape(name, tuple(t.shape))) for name, t in tensors.items()}
    if weight_transposed_in_file(scheme, conv1d):
        stored["weight"] = tensors["weight"].t().contiguous()
    return stored


def weight_transposed_in_file(scheme: str, conv1d: bool) -> bool:
    """Whether a layer's quantized weight is [K, N] in the file: a Conv1D's, as GPT-2 holds its float
    weight, unless the scheme packs its weight along K (`Scheme.packed_weight`: held as the op takes it)."""
    return conv1d and not get_scheme(scheme).packed_weight


def layer_shape(module: nn.Module) -> list[int]:
    """[N, K] of an nn.Linear or Conv1D, whichever way its weight is held."""
    return [module.nf, module.nx] if is_conv1d(module) else [module.out_features, module.in_features]


def _traced_module_type(site: GemmSite) -> type | None:
    """The class of the module whose forward ran `site` in a traced graph (a class, or its qualified
    name under torch.export, whose module the model's existence has imported)."""
    stack = site.node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    module_type = list(stack.values())[-1][1]
    if isinstance(module_type, str):
        module_name, _, class_name = module_type.rpartition(".")
        module_type = getattr(sys.modules.get(module_name), class_name, None)
    return module_type if isinstance(module_type, type) else None


def traced_storage(layer: str, site: GemmSite) -> bool:
    """For a layer of a traced graph: True for a Conv1D, False for an nn.Linear (its quantized weight's
    file layout); a ValueError naming the layer and parameter when a checkpoint cannot store it."""
    module_type, conv1d = _traced_module_type(site), conv1d_type()
    is_linear = isinstance(module_type, type) and issubclass(module_type, nn.Linear) and not site.weight_is_kn
    is_conv = conv1d is not None and isinstance(module_type, type) and issubclass(module_type, conv1d) and site.weight_is_kn
    if site.weight_name == (f"{layer}.weight" if layer else "weight") and (is_linear or is_conv):
        return is_conv
    used = f"parameter '{site.weight_name}'" if layer == site.weight_name else f"layer '{layer}' (parameter '{site.weight_name}')"
    raise ValueError(
        f"fxquant: {used} is multiplied outside an nn.Linear or Conv1D weight; a checkpoint stores only those "
        "quantized (skip it with QuantConfig.skip to save the program)"
    )


def _stored_disagreement(name: str, site: GemmSite, scheme: str, config: QuantConfig) -> str | None:
    """Why a stored layer does not fit the checkpoint `config` describes, or None."""
    decision = config.decide(name)
    if decision.scheme is None:
        return f"the config's {'skip list' if decision.source == 'skip' else 'rules'} has {decision.pattern!r}"
    if decision.scheme != scheme:
        return f"the config asks for {decision.scheme}"
    stored, wanted = getattr(STORED_WEIGHTS.get(site.weight), "options", None), config.options_for(scheme)
    for field in dataclasses.fields(wanted) if stored is not None else ():
        if getattr(stored, field.name) != getattr(wanted, field.name):
            return f"it runs with {field.name} {getattr(stored, field.name)}, the config has {getattr(wanted, field.name)}"
    return None


def _stored_entry(name: str, module: nn.Module, config: QuantConfig) -> PlannedLinear:
    site = layer_site(name, module)
    scheme, tensors, note = stored_scheme(site)
    problem = note if scheme is None else _stored_disagreement(name, site, scheme, config)
    if problem is not None:
        stored = f" as {scheme}" if scheme else ""
        raise ValueError(
            f"fxquant: layer '{name}' is stored quantized{stored} and cannot be quantized again: {problem}; "
            "save it with the QuantConfig it was loaded with (fxquant.checkpoint.read_metadata(directory)[1])"
        )
    return PlannedLinear(name, site, scheme, STORED_NOTE, config.options_for(scheme), stored=tensors)


def plan_modules(model: nn.Module, config: QuantConfig) -> Plan:
    """The plan of every nn.Linear and Conv1D of `model`, in module order, by the plan pass's rules
    (QuantConfig.rules, skip, scheme); no tracing. Layers stored quantized keep their scheme; layers the
    model class keeps in float32 and other 2-D parameters are listed unquantized.

    Unlike the backend's plan there is no device fallback: a checkpoint stores the scheme asked for.
    """
    plan = Plan()
    plan.float32_modules = tuple(sorted(getattr(model, "_keep_in_fp32_modules", None) or ()))
    float32_note = f"transformers keeps it in float32 ({type(model).__name__}._keep_in_fp32_modules)"
    for name, module in model.named_modules():
        if is_checkpoint_layer(module) and is_stored(module.weight):
            plan.append(_stored_entry(name, module, config))
        elif is_checkpoint_layer(module) and not_converted(name, plan.float32_modules):
            plan.append(PlannedLinear(name, layer_site(name, module), None, float32_note))
        elif is_checkpoint_layer(module):
            plan.append(decide(name, layer_site(name, module), config))
        elif not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            for attr, parameter in module.named_parameters(prefix=name, recurse=False):
                if parameter.dim() == 2 and parameter.is_floating_point():
                    plan.append(PlannedLinear(attr, _site(attr, parameter, "matmul", False), None, RAW_PARAMETER_NOTE))
    return plan
