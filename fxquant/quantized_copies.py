"""Who owns a compiled model's quantized weights: its parameters, and the graphs compiled from them.

The backend keeps each parameter's quantized copies in `COPIES`, keyed weakly by the parameter, so
that every graph Dynamo compiles for one model (static first, dynamic after, prefill and decode)
shares one copy. A copy goes when its parameter does (the model is deleted) and no compiled graph
holds it, or earlier with `release(model)`:

    fast = torch.compile(model, backend="fxquant"); fast(x)
    torch._dynamo.reset()            # the compiled graphs go; the copies stay with the model's parameters
    fxquant.release(model)           # ... until released: freed now, re-made by the next compile
"""

from __future__ import annotations

from torch import nn

from fxquant.footprint import nbytes

from fxquant.passes.quantize_weights import QuantizedCache, QuantizedCopy

# parameter → {cache key: QuantizedCopy}; what `quantized_copies` shows and `release` empties.
COPIES = QuantizedCache()


def quantized_copies(model: nn.Module) -> list[QuantizedCopy]:
    """The quantized copies the backend keeps of `model`'s parameters, in parameter order."""
    return [copy for param in model.parameters() for copy in COPIES.get(param, {}).values()]


def release(model: nn.Module) -> int:
    """Drop the backend's quantized copies of `model`'s parameters; returns the bytes they held.

    A graph compiled before keeps the tensors it runs on (they are freed with it: delete the
    compiled model or `torch._dynamo.reset()`); a compile after this quantizes again."""
    released = 0
    for param in model.parameters():
        for copy in COPIES.pop(param, {}).values():
            released += sum(nbytes(t.dtype, t.shape) for t in copy.tensors.values())
    return released

