"""Inductor's heuristics with whole-row reductions, for fxquant's decode-shaped graphs.

At decode an RMSNorm + quantization kernel reduces a handful of rows of the hidden size (4096 in
Llama-3-8B) twice, for the norm and for the amax. Inductor makes reductions over more than 1024
elements loop over the row, one dependent memory round trip per block; a persistent reduction holds
the whole row in registers and reads it once: 0.1-0.7 µs less per kernel on the H100, 0.8 % less
GPU time per decode forward on the H200 (RESULTS.md, seventh and eighth sessions). Wider rows stay
Inductor's: SiLU·mul's 14336-wide row was slower persistent (5.3 µs against 5.0 looped).
"""

from __future__ import annotations

from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

WHOLE_ROW_LIMIT = 8192


class WholeRowReductions(InductorChoices):
    """Inductor's choices, except that an inner reduction over at most WHOLE_ROW_LIMIT elements per
    row is persistent. Needs `split_reductions=False` to see the whole row (a split reduction is
    decided before this)."""

    def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
        if (
            inductor_config.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, WHOLE_ROW_LIMIT)
        ):
            return True
        return super().should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:
        """Part of the compiled graph's cache key (Inductor asks this of `inductor_choices_class`)."""
        return f"{type(self).__qualname__}:{WHOLE_ROW_LIMIT}"
