"""Inductor's heuristics with whole-row reductions, for fxquant's decode-shaped graphs.

At decode an RMSNorm + quantization kernel reduces a handful of rows of the hidden size (4096 in
Llama-3-8B) twice, for the norm and for the amax. Inductor makes reductions over more than 1024
elements loop over the row, one dependent memory round trip per block; a persistent reduction holds
the whole row in registers and reads it once: 0.1-0.7 µs less per kernel on the H100, 0.8 % less
GPU time per decode forward on the H200 (RESULTS.md, seventh and eighth sessions). Wider rows stay
Inductor's: SiLU·mul's 14336-wide row was slower persistent (5.3 µs against 5.0 looped). The limit
is per GPU (fxquant/inductor/tuning.py), as are the GEMM lowering's constants, which it reads
through Inductor's choices handler (`tuning`): a subclass's `fxquant_tuning` overrides them.
"""

from __future__ import annotations

import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from fxquant.inductor.tuning import DeviceTuning, device_tuning


def tuning(device: torch.device | None = None) -> DeviceTuning:
    """fxquant's tuning row for `device` (None: the current CUDA device), as Inductor's choices handler
    gives it: its `fxquant_tuning` where it has one (fxquant's choices, or a user's subclass), else the
    table's (Inductor's own handler, as in graphs that are not decode-shaped)."""
    lookup = getattr(V.choices, "fxquant_tuning", None)
    return lookup(device) if lookup is not None else device_tuning(device)


class WholeRowReductions(InductorChoices):
    """Inductor's choices, except that an inner reduction over at most the GPU's `whole_row_limit`
    elements per row is persistent. Needs `split_reductions=False` to see the whole row (a split
    reduction is decided before this)."""

    def fxquant_tuning(self, device: torch.device | None = None) -> DeviceTuning:
        """The tuning row for `device` (fxquant/inductor/tuning.py); override to tune another GPU."""
        return device_tuning(device)

    def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
        limit = self.fxquant_tuning(getattr(V.graph, "current_device", None)).whole_row_limit
        if (
            inductor_config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)
        ):
            return True
        return super().should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:
        """Part of the compiled graph's cache key (Inductor asks this of `inductor_choices_class`); the
        tuning table is in fxquant's lowering sources, which the backend's cache tag hashes."""
        return f"{type(self).__qualname__}:{self.fxquant_tuning().name}"
