"""fxquant's graph passes (installed as `fxquant.passes`): pure GraphModule → GraphModule transforms.

Each pass works on both torch-level graphs (what a Dynamo backend receives: `F.linear`,
`operator.matmul`, `Tensor.t`) and aten-level graphs (`torch.export`: `aten.linear`, `aten.mm`,
`aten.t`). Parameters are found through a `WeightLookup` that the entry point supplies, so no pass
knows whether it runs under Dynamo or export. The order lives in `fxquant/pipeline.py` only.

Invariants every pass keeps:
- nodes it does not rewrite, and the layers the plan skips, are left exactly as they were;
- a rewritten node keeps its `meta` (fake value, `nn_module_stack`, stack trace);
- placeholders are never removed or reordered (Dynamo calls the graph with the same inputs);
- the user's parameters are read, never written; quantized tensors are new buffers on the
  GraphModule;
- every rewrite is counted in `torch._dynamo.utils.counters["fxquant"]`.
"""

from fxquant.passes.find_sites import GemmSite, WeightLookup, find_sites
from fxquant.passes.merge_parallel_linears import merge_parallel_linears, plan_merges
from fxquant.passes.plan_linears import Plan, PlannedLinear, plan_linears
from fxquant.passes.quantize_before_gather import quantize_before_gathers
from fxquant.passes.quantize_weights import QuantizedWeight, quantize_weights
from fxquant.passes.rewrite_linears import rewrite_linears

__all__ = [
    "GemmSite",
    "Plan",
    "PlannedLinear",
    "QuantizedWeight",
    "WeightLookup",
    "find_sites",
    "merge_parallel_linears",
    "plan_linears",
    "plan_merges",
    "quantize_before_gathers",
    "quantize_weights",
    "rewrite_linears",
]
