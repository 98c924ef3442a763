"""Keep a compiled graph's quantized weights in step with the user's parameters.

Dynamo passes parameters as runtime inputs and does not recompile when one changes, so baked-in
quantized copies would go stale. `RequantizeOnUpdate` wraps the compiled callable: each call checks
every quantized parameter against the `WeightStamp` of its copy (identity, version counter and
storage, then the sampled values of all of them in one comparison) and re-quantizes the copies of
the ones that changed, in place, for every graph that shares them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fxquant.log import logger
from fxquant.passes import QuantizedWeight
from fxquant.weight_stamp import SampledValues, WeightStamp


class RequantizeOnUpdate:
    """Calls `compiled(*args)` after refreshing any quantized weight whose parameter changed."""

    def __init__(self, compiled: Callable, watched: Sequence[tuple[int, QuantizedWeight]]):
        self.compiled = compiled
        self.watched = list(watched)  # (index of the parameter among the graph's inputs, its quantized copy)
        self.sampled_values = SampledValues()

    def __call__(self, *args):
        for index, quantized in self.changed(args):
            logger.log(logging.INFO, "fxquant: weight of %s changed since compilation; re-quantizing", ", ".join(quantized.layers))
            quantized.refresh(args[index])
        return self.compiled(*args)

    def changed(self, args: Sequence) -> list[tuple[int, QuantizedWeight]]:
        """The watched weights that are no longer what their copies were made from."""
        stamps = [quantized.copy.stamp for _, quantized in self.watched]
        weights = [args[index] for index, _ in self.watched]
        if all(map(WeightStamp.same_object, stamps, weights)) and self.sampled_values.unchanged(stamps):
            return []
        return [(index, quantized) for index, quantized in self.watched if not quantized.copy.stamp.matches(args[index])]
