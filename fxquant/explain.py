"""`fxquant.plan(model, *args)`: what the backend would do to each linear layer, without compiling."""

from __future__ import annotations

import torch

from fxquant.config import QuantConfig
from fxquant.dynamo_params import dynamo_module_tensor
from fxquant.passes import Plan, plan_linears


def plan(model: torch.nn.Module, *args, config: QuantConfig | None = None, **kwargs) -> Plan:
    """Trace `model(*args, **kwargs)` with Dynamo and return the plan of every graph (printable table).

    The model runs once, eagerly, under no_grad; nothing is quantized or compiled by Inductor.
    """
    config = config or QuantConfig()
    result = Plan()

    def planner(gm, example_inputs, **_):
        result.extend(plan_linears(gm, dynamo_module_tensor, config))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=planner, dynamic=False)(*args, **kwargs)
    return result
