"""What the FP8 schemes' expert ops share around their grouped GEMMs, all on the device (no host sync:
CUDA graphs), used by their CUDA kernels and Inductor decompositions alike:

    check_gather(op, rows)                                   a grouped op's `rows`: x's row indices
    gathered(rows, x_q, x_scale)                             the rows an expert op reads, of x quantized
                                                             (rows None: x's own)
    rows_in_groups(y, offsets)                               the rows past offsets[-1] set to 0
    batched_as_grouped(grouped_gemm, x_q, x_scale, ids, E)   the batched form by the grouped GEMM: the
                                                             rows ordered by expert, the results put back
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def check_gather(op: str, rows: Tensor | None) -> None:
    """A grouped op's `rows`: None, or a 1-D integer (not bool) tensor of x's row indices."""
    torch._check(rows is None or (rows.dim() == 1 and not rows.is_floating_point() and rows.dtype != torch.bool),
                 lambda: f"{op}: rows must be a 1-D integer tensor (indices of x's rows)")


def gathered(rows: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor's rows `rows` (tensor[rows]), or the tensors as they are where `rows` is None."""
    return tensors if rows is None else tuple(tensor[rows] for tensor in tensors)


def rows_in_groups(y: Tensor, offsets: Tensor) -> Tensor:
    """y with its rows past offsets[-1] set to 0 (a grouped GEMM leaves them unspecified)."""
    rows = torch.arange(y.shape[0], device=y.device).unsqueeze(-1)
    return torch.where(rows < offsets[-1], y, 0)


def batched_as_grouped(
    grouped_gemm: Callable[[Tensor, Tensor, Tensor], Tensor], x_q: Tensor, x_scale: Tensor, expert_ids: Tensor, experts: int,
) -> Tensor:
    """Row s of x_q times expert expert_ids[s], by `grouped_gemm(x_q, x_scale, offsets)` (int32 offsets)
    on the rows ordered by expert (a stable sort), the groups' running sum counted on the device, and
    each result gathered back to its row."""
    rows = expert_ids.shape[0]
    order = torch.argsort(expert_ids, stable=True)
    counts = expert_ids.new_zeros(experts, dtype=torch.int32).scatter_add(
        0, expert_ids.long(), expert_ids.new_ones(rows, dtype=torch.int32))
    y = grouped_gemm(x_q[order], x_scale[order], counts.cumsum(0, dtype=torch.int32))
    back = torch.zeros_like(order).scatter(0, order, torch.arange(rows, device=order.device))
    return y[back]
