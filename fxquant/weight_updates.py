"""Keep a compiled graph's quantized weights in step with the user's parameters.

Dynamo passes parameters as runtime inputs and does not recompile when one changes in place, so
baked-in quantized copies would go stale. `RequantizeOnUpdate` wraps the compiled callable: each
call compares every quantized parameter's identity and version counter with the ones it was
quantized from, and re-quantizes into the same buffers when they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fxquant.log import logger
from fxquant.passes import QuantizedWeight


class RequantizeOnUpdate:
    """Calls `compiled(*args)` after refreshing any quantized weight whose parameter changed."""

    def __init__(self, compiled: Callable, watched: Sequence[tuple[int, QuantizedWeight]]):
        self.compiled = compiled
        self.watched = list(watched)  # (index of the parameter among the graph's inputs, its quantized copy)

    def __call__(self, *args):
        for index, quantized in self.watched:
            weight = args[index]
            if weight is not quantized.source or weight._version != quantized.version:
                logger.log(logging.INFO, "fxquant: weight of %s changed since compilation; re-quantizing", ", ".join(quantized.layers))
                quantized.refresh(weight)
        return self.compiled(*args)
