"""The `torch.compile` backend: plan, quantize and rewrite the Dynamo graph, then compile with Inductor.

    torch.compile(model, backend="fxquant", options={"scheme": "int8"})     # entry point, no import
    torch.compile(model, backend=fxquant.backend(QuantConfig(scheme="int8")))
    torch.compile(model, backend=fxquant.backend(inductor={"split_reductions": True}))  # Inductor settings
    torch.compile(model, backend=fxquant.backend(keep_graphs=True))          # tests, inspection

A backend keeps no compiled graph unless asked: `plans` holds each graph's plan as plain rows
(fxquant/plan_summary.py). The quantized weights belong to the model's parameters and the graphs
that run them (fxquant/quantized_copies.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx
from torch._dynamo.source import ConstantSource
from torch._inductor.compile_fx import compile_fx

from fxquant.config import QuantConfig
from fxquant.dynamo_params import dynamo_module_tensor
from fxquant.inductor.compile_settings import compile_settings
from fxquant.inductor.install import install, lowered_on
from fxquant.log import logger
from fxquant.passes import Plan
from fxquant.passes.merge_parallel_linears import hold_stored_in_stacks
from fxquant.passes.quantize_weights import QuantizedWeight
from fxquant.pipeline import quantize_graph
from fxquant.plan_summary import PlanSummary
from fxquant.quantized_copies import COPIES
from fxquant.weight_updates import RequantizeOnUpdate


class Backend:
    """A Dynamo backend that quantizes linear layers under `config`.

    `plans` holds the plan of every graph it compiled, in order, as a PlanSummary (rows of plain
    values: nothing of the graph). `keep_graphs=True` (for inspection and tests) keeps the graphs
    alive instead: `graphs` holds the rewritten GraphModules handed to Inductor, and `plans` the
    full Plans (their sites' nodes, their quantized weights). `inductor`: Inductor config patches
    for the compiled graphs, applied after the compile mode's and fxquant's own
    (fxquant/inductor/settings.py).
    """

    def __init__(
        self, config: QuantConfig | None = None, inductor: Mapping[str, object] | None = None, keep_graphs: bool = False
    ):
        self.config = config or QuantConfig()
        self.inductor = dict(inductor or {})
        self.keep_graphs = keep_graphs
        self.plans: list[Plan] = []
        self._graphs: list[fx.GraphModule] = []

    @property
    def graphs(self) -> list[fx.GraphModule]:
        """The rewritten GraphModules, in order (only with keep_graphs=True)."""
        if not self.keep_graphs:
            raise AttributeError("fxquant: this backend keeps no compiled graphs; create it with keep_graphs=True")
        return self._graphs

    def __deepcopy__(self, memo: dict) -> Backend:
        """The backend itself: transformers deep-copies a generation config's `compile_config` on every
        `generate`, and a copy would record its plans out of the user's sight and recompile each time."""
        return self

    def rewrite(self, gm: fx.GraphModule) -> tuple[Plan, list[QuantizedWeight]]:
        """Run fxquant's passes on a Dynamo graph in place; returns the plan and the quantized weights."""
        plan, quantized = quantize_graph(gm, dynamo_module_tensor, self.config, COPIES, merge=True)
        _declare_buffers_to_dynamo(gm)
        if self.keep_graphs:
            self.plans.append(plan)
            self._graphs.append(gm)
        else:
            self.plans.append(PlanSummary(plan))
        if plan:
            logger.info("fxquant plan (%s):\n%s", self.config.scheme, plan)
        return plan, quantized

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence, mode: str | None = None, **_: object) -> Callable:
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        plan, quantized = self.rewrite(gm)
        install()  # Inductor's own table then holds fxquant's decompositions (fxquant/inductor/install.py)
        mode_patches = torch._inductor.list_mode_options(mode) if mode else {}
        with compile_settings(gm, mode_patches, self.inductor, lowered=lowered_on(example_inputs)) as patches:
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        hold_stored_in_stacks(plan)
        if not (self.config.check_weight_updates and quantized):
            return compiled
        index_of = {id(node.meta["grapharg"].example): i for i, node in enumerate(placeholders) if "grapharg" in node.meta}
        return RequantizeOnUpdate(compiled, [(index_of[id(q.source)], q) for q in quantized])


def _declare_buffers_to_dynamo(gm: fx.GraphModule) -> None:
    """AOTAutograd expects a source for every tensor attribute of a Dynamo graph: name ours."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    for name, _ in gm.named_buffers():
        if name.startswith("fxquant_"):
            sources.setdefault(name, ConstantSource(name))


def backend(
    config: QuantConfig | None = None,
    *,
    inductor: Mapping[str, object] | None = None,
    keep_graphs: bool = False,
    **options: object,
) -> Backend:
    """A backend for `torch.compile(model, backend=...)`, from a QuantConfig or keyword options;
    `inductor`: Inductor config patches for its graphs (they win over fxquant's own); `keep_graphs`:
    keep the compiled graphs and their full plans (Backend)."""
    if config is not None and options:
        raise ValueError("fxquant.backend: pass a QuantConfig or keyword options, not both")
    return Backend(config or QuantConfig.from_options(options), inductor, keep_graphs)


def fxquant_backend(
    gm: fx.GraphModule, example_inputs: Sequence, options: Mapping[str, object] | None = None, mode: str | None = None, **kwargs
) -> Callable:
    """`backend="fxquant"` (registered as a torch_dynamo_backends entry point); `options` are
    QuantConfig's fields and `inductor` (Inductor config patches)."""
    options = dict(options or {})
    inductor = options.pop("inductor", None)
    return Backend(QuantConfig.from_options(options), inductor)(gm, example_inputs, mode=mode, **kwargs)


