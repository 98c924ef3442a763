"""What a backend remembers of each graph it compiled: the plan's rows as plain values.

A `Plan` references its graph (each site's fx nodes) and the quantized weights; kept by a backend
for every graph, it would keep them all alive. A `PlanSummary` keeps what the plan says (its
table and, per layer, the layer, op, shape, scheme, note and rule) and nothing of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.passes import Plan


@dataclass(frozen=True)
class PlannedLayer:
    """One row of a plan: a layer and what fxquant did with it (scheme None: left unchanged)."""

    layer: str
    op: str
    shape: str
    scheme: str | None
    note: str
    merged_with: tuple[str, ...]
    rule: str | None  # the QuantConfig.rules glob that decided the layer, if one did
    kind: str = "linear"  # the GEMM site kind: "linear", "batched" or "grouped"
    bytes_before: int = 0  # the weight as the model holds it
    bytes_after: int = 0  # the weight as fxquant runs it


class PlanSummary(Plan):
    """A Plan of plain rows: the PlannedLayer of each of one graph's layers; prints as that plan's table."""

    def __init__(self, plan: Plan):
        super().__init__(
            PlannedLayer(e.layer, e.site.op, e.shape, e.scheme, e.note, e.merged_with, e.rule, e.site.kind,
                         e.bytes_before, e.bytes_after)
            for e in plan
        )
        self.table = str(plan)

    def __str__(self) -> str:
        return self.table
