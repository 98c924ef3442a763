"""`fxquant.plan(model, *args)`: what the backend would do to each linear layer, without compiling."""

from __future__ import annotations

import torch

from fxquant.config import QuantConfig
from fxquant.dynamo_params import dynamo_module_tensor
from fxquant.passes import Plan, plan_linears, plan_merges
from fxquant.pipeline import quantize_graph


def plan(model: torch.nn.Module, *args, config: QuantConfig | None = None, **kwargs) -> Plan:
    """Trace `model(*args, **kwargs)` with Dynamo and return the plan of every graph (printable table).

    The model runs once, eagerly, under no_grad; nothing is compiled by Inductor, and nothing is
    quantized unless the model holds stored low-precision weights (which only fxquant's ops run).
    """
    if any(isinstance(arg, QuantConfig) for arg in args):
        raise TypeError("fxquant.plan: pass the QuantConfig by name, fxquant.plan(model, *inputs, config=...); "
                        "positional arguments are the model's inputs")
    config = config or QuantConfig()
    result = Plan()

    def planner(gm, example_inputs, **_):
        graph_plan = plan_linears(gm, dynamo_module_tensor, config)
        if config.merge_parallel_linears:
            plan_merges(graph_plan)
        result.extend(graph_plan)
        if any(entry.stored is not None for entry in graph_plan):
            quantize_graph(gm, dynamo_module_tensor, config)  # stored low-precision weights only run in fxquant's ops
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=planner, dynamic=False)(*args, **kwargs)
    return result
