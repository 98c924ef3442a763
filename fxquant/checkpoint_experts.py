"""Expert weights in checkpoints: a transformers MoE model's 3-D `gate_up_proj` [E, 2I, H] /
`down_proj` [E, H, I], stored one tensor per expert under the names HF checkpoints use, the layout
vLLM and transformers read (compressed-tensors: each expert a Linear):

    model.layers.0.mlp.experts.gate_up_proj  e4m3 [E, 2I, H] + scale    (what the model holds)
      ↔ model.layers.0.mlp.experts.{e}.gate_proj.weight  [I, H]   .weight_scale  [I, 1] (rowwise) / [I/bn, H/bk] (blockwise)
        model.layers.0.mlp.experts.{e}.up_proj.weight    [I, H]   .weight_scale
    (Mixtral: ...mlp.experts.{e}.w1 / w3 / w2; each tensor of the scheme is cut along N where its
    `merge_dims` says N runs)

The per-expert names are read from transformers' own weight conversion mapping (the converters that
stack per-expert tensors with MergeModulelist and concatenate gate and up with Concatenate along N),
not written here per model. A 3-D parameter without such a converter (gpt-oss: fused in its own
checkpoints, [E, K, N]) is listed unquantized with the reason. Loaded, an expert weight is held as
the op takes it: `<experts>.gate_up_proj` e4m3 [E, N, K] and its scheme's other tensors as buffers
`<experts>.gate_up_proj_scale`, ... ([E, N] rowwise, [E, N/bn, K/bk] blockwise), registered as stored
(passes/stored_weights.py), as a linear layer's `weight` and `weight_scale` are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from fxquant.config import QuantConfig
from fxquant.passes.find_sites import GemmSite
from fxquant.passes.plan_linears import Plan, PlannedLinear, decide
from fxquant.passes.stored_weights import STORED_WEIGHTS, is_stored
from fxquant.stored_experts import make_stored_experts
from fxquant.scheme import get_scheme

NO_EXPERT_NAMES = "expert weights without per-expert names in transformers' conversion mapping: checkpoints store them as they are"
PLAIN_PATTERN = re.compile(r"^[\w.]*\*[\w.]*$")


@dataclass(frozen=True)
class ExpertTensor:
    """A 3-D expert weight [E, N, K] and its per-expert module names ("...experts.{e}.gate_proj"),
    each taking an equal share of N in order (gate, then up)."""

    name: str
    shape: tuple[int, int, int]
    parts: tuple[str, ...]

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def attr(self) -> str:
        return self.name.rpartition(".")[2]

    def stored_attr(self, tensor: str) -> str:
        """The module attribute of the scheme's tensor `tensor` ("weight_scale" → "gate_up_proj_scale")."""
        return self.attr + tensor.removeprefix("weight")

    def file_name(self, part: int, expert: int, tensor: str) -> str:
        return f"{self.parts[part].format(e=expert)}.{tensor}"

    def file_names(self, tensor: str) -> list[str]:
        return [self.file_name(p, e, tensor) for e in range(self.shape[0]) for p in range(len(self.parts))]


def _converters(model: nn.Module) -> list[tuple[list[str], str]]:
    """(per-expert source patterns, target) of transformers' converters that stack experts (MergeModulelist
    on dim 0, then at most a Concatenate on dim 1) for `model`; none for a model transformers does not map."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    found = []
    for converter in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(converter, WeightConverter):
            continue
        sources, targets, ops = converter._original_source_patterns, converter._original_target_patterns, converter.operations
        stacks = ops[:1] and type(ops[0]) is MergeModulelist and ops[0].dim == 0
        joins = all(type(op) is Concatenate and op.dim == 1 for op in ops[1:]) and len(ops) <= 2
        plain = all(PLAIN_PATTERN.match(s) and s.endswith(".weight") for s in sources) and len(targets) == 1
        if stacks and joins and plain and (len(ops) == 2 or len(sources) == 1):
            found.append((list(sources), targets[0]))
    return found


def renamed_by_transformers(model: nn.Module, names) -> dict[str, str]:
    """{checkpoint name: the model's name for it} by transformers' renamings for `model` (its conversion
    mapping's WeightRenaming entries: Mixtral's `block_sparse_moe` → `mlp`); names it keeps map to themselves."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return {name: name for name in names}
    if not isinstance(model, PreTrainedModel):
        return {name: name for name in names}
    renamings = [t for t in get_model_conversion_mapping(model, add_legacy=False) if type(t) is WeightRenaming]
    renamed = {}
    for name in names:
        new = name
        for renaming in renamings:
            new, _ = renaming.rename_source_key(new)
        renamed[name] = new
    return renamed


def expert_tensors(model: nn.Module) -> dict[str, ExpertTensor]:
    """{parameter name: ExpertTensor} for every 3-D parameter transformers' mapping stacks from per-expert tensors."""
    converters = _converters(model)
    found = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() != 3:
            continue
        for sources, target in converters:
            bare = target.lstrip(".")
            if not (name == bare or name.endswith("." + bare)):
                continue
            prefix = name[: len(name) - len(bare)]
            parts = tuple((prefix + source.lstrip(".")).replace("*", "{e}").removesuffix(".weight") for source in sources)
            if parameter.shape[1] % len(parts) == 0:
                found[name] = ExpertTensor(name, tuple(parameter.shape), parts)
            break
    return found


@dataclass
class PlannedExperts(PlannedLinear):
    """A checkpoint plan's row for an expert weight: a PlannedLinear with its per-expert names."""

    expert: ExpertTensor | None = field(default=None, repr=False)


def _expert_site(name: str, weight: Tensor) -> GemmSite:
    """`weight` [E, N, K] as the one-node graph `_grouped_mm(x, weight.transpose(-2, -1), offs=offsets)`,
    so that the plan pass's `skip_reason` judges it as the trace's grouped site."""
    graph = fx.Graph()
    x, offsets = graph.placeholder("x"), graph.placeholder("offsets")
    x.meta["val"] = torch.empty(0, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    w = graph.get_attr("weight")
    view = graph.call_method("transpose", (w, -2, -1))
    node = graph.call_function(torch._grouped_mm, (x, view), {"offs": offsets})
    return GemmSite(node, "grouped", "grouped_mm", name, weight, weight_is_kn=False, view_node=view)


def _split_problem(expert: ExpertTensor, scheme: str, options: object) -> str | None:
    """Why the scheme's expert tensors do not cut into per-expert parts along N, or None."""
    plugin = get_scheme(scheme)
    for tensor, shape in op_shapes(expert, scheme, options).items():
        dim = plugin.merge_dims.get(tensor)
        if dim is None or shape[dim + 1] % len(expert.parts):
            return f"{scheme}'s {tensor} {list(shape)} does not cut into {len(expert.parts)} per-expert parts along N"
    return None


def op_shapes(expert: ExpertTensor, scheme: str, options: object) -> dict[str, tuple[int, ...]]:
    """The scheme's tensors of the [E, N, K] weight, as the op takes them (quantized on meta)."""
    quantized = get_scheme(scheme).quantize(torch.empty(expert.shape, device="meta"), options)
    return {name: tuple(t.shape) for name, t in quantized.items()}


def plan_experts(model: nn.Module, config: QuantConfig) -> Plan:
    """The plan rows of `model`'s expert weights (one per 3-D tensor transformers' mapping stacks per
    expert, or held by an `experts` module; by the config's rules as for a layer); those stored quantized
    keep their scheme; those without per-expert names stay as they are."""
    experts = expert_tensors(model)
    plan = Plan()
    for name, parameter in model.named_parameters():
        if parameter.dim() != 3 or name not in experts and not name.rpartition(".")[0].endswith("experts"):
            continue  # not an expert weight (ViT's position embeddings are 3-D too)
        site = _expert_site(name, parameter)
        expert = experts.get(name)
        if expert is None:
            plan.append(PlannedExperts(name, site, None, NO_EXPERT_NAMES))
        elif is_stored(parameter) and parameter in STORED_WEIGHTS:
            stored = STORED_WEIGHTS[parameter]
            tensors = {t: getattr(model.get_submodule(expert.module), expert.stored_attr(t))
                       for t in get_scheme(stored.scheme).tensors if t != "weight"}
            plan.append(PlannedExperts(name, site, stored.scheme, "stored quantized weights", stored.options,
                                       stored=tensors, expert=expert))
        else:
            entry = decide(name, site, config)
            problem = entry.scheme and _split_problem(expert, entry.scheme, entry.options)
            if problem:
                plan.append(PlannedExperts(name, site, None, f"{entry.note}; {problem}".lstrip("; "), rule=entry.rule))
            else:
                plan.append(PlannedExperts(name, site, entry.scheme, entry.note, entry.options, rule=entry.rule, expert=expert))
    return plan


def file_tensors(expert: ExpertTensor, scheme: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The scheme's expert tensors (op layout, [E, ...]) as the files hold them: per expert and part,
    each cut along N and in the scheme's file layout, by file name."""
    plugin = get_scheme(scheme)
    files = {}
    for e in range(expert.shape[0]):
        for p in range(len(expert.parts)):
            for tensor, value in tensors.items():
                dim = plugin.merge_dims[tensor]
                rows = value.shape[dim + 1] // len(expert.parts)
                part = value[e].narrow(dim, p * rows, rows).contiguous()
                files[expert.file_name(p, e, tensor)] = part.reshape(plugin.file_shape(tensor, tuple(part.shape)))
    return files


def file_layout(expert: ExpertTensor, scheme: str, options: object) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{file name: (dtype, shape)} of the files' tensors for the expert weight stored with `scheme`."""
    meta = {t: torch.empty(shape, dtype=get_scheme(scheme).tensors[t], device="meta")
            for t, shape in op_shapes(expert, scheme, options).items()}
    return {name: (t.dtype, tuple(t.shape)) for name, t in file_tensors(expert, scheme, meta).items()}


class ExpertJoin:
    """Per-expert file tensors gathered into the op's [E, ...] tensors on `device`, as they are read."""

    def __init__(self, expert: ExpertTensor, scheme: str, options: object, device: torch.device | str):
        self.expert, self.scheme, self.options = expert, scheme, options
        plugin = get_scheme(scheme)
        self.tensors = {t: torch.empty(shape, dtype=plugin.tensors[t], device=device)
                        for t, shape in op_shapes(expert, scheme, options).items()}
        self.places = {expert.file_name(p, e, t): (t, e, p) for t in self.tensors
                       for e in range(expert.shape[0]) for p in range(len(expert.parts))}

    def put(self, name: str, value: Tensor) -> None:
        tensor, e, p = self.places[name]
        dim = get_scheme(self.scheme).merge_dims[tensor]
        target = self.tensors[tensor][e]
        rows = target.shape[dim] // len(self.expert.parts)
        part = target.narrow(dim, p * rows, rows)
        part.copy_(value.to(part.dtype).reshape(part.shape))

    def hold(self, module: nn.Module) -> None:
        """Hold the joined tensors on the experts module: the weight as its parameter, the others as buffers."""
        module._parameters[self.expert.attr] = nn.Parameter(self.tensors["weight"], requires_grad=False)
        for tensor, value in self.tensors.items():
            if tensor != "weight":
                module.register_buffer(self.expert.stored_attr(tensor), value)


def hold_stored_experts(model: nn.Module, joins: list[ExpertJoin]) -> None:
    """Put each joined expert weight in place of its float parameter, an experts module's weights
    together, registered as stored with their scheme and options."""
    by_module: dict[str, list[ExpertJoin]] = {}
    for join in joins:
        by_module.setdefault(join.expert.module, []).append(join)
    for name, group in by_module.items():
        module = model.get_submodule(name)
        dtypes = {join.expert.attr: module._parameters[join.expert.attr].dtype for join in group}
        for join in group:
            join.hold(module)
        make_stored_experts(module, {join.expert.attr: (dtypes[join.expert.attr], join.scheme, join.options) for join in group})
