"""Name the parameters and buffers in a Dynamo graph: the `WeightLookup` the backend gives the passes.

Dynamo hands parameters to a backend as placeholders. Each carries `meta["grapharg"]`, whose
`.example` is the parameter object itself and whose `.source` is the chain of attribute and
item accesses that reached it from the compiled frame (`L['self']._modules['fc']._parameters
['weight']`). Walking that chain gives the qualified name "fc.weight", however the model was
compiled; placeholder names are never parsed.
"""

from __future__ import annotations

import torch
from torch import fx

# Attribute hops that nn.Module inserts between a module and its children or tensors.
_CONTAINER_ATTRS = {"_modules", "_parameters", "_buffers"}


def qualified_name(source: object) -> str | None:
    """'layers.0.fc.weight' for a Source chain rooted at the compiled frame's local or global: the
    module itself (`L['self']`), or `L['args'][0]` where the frame is a `*args` wrapper's around the
    model's `forward` (transformers' decorated forwards), whose first argument is the model."""
    chain: list[object] = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    root, *hops = reversed(chain)
    if hops and getattr(root, "local_name", None) == "args" and getattr(hops[0], "index", None) == 0:
        hops = hops[1:]
    parts: list[str] = []
    for hop in hops:
        member, index = getattr(hop, "member", None), getattr(hop, "index", None)
        if isinstance(member, str) and member not in _CONTAINER_ATTRS:
            parts.append(member)
        elif isinstance(index, (str, int)):
            parts.append(str(index))
    return ".".join(parts) or None


def _is_buffer(source: object) -> bool:
    while source is not None:
        if getattr(source, "member", None) == "_buffers":
            return True
        source = getattr(source, "base", None)
    return False


def dynamo_module_tensor(node: fx.Node) -> tuple[str, torch.Tensor] | None:
    """(qualified name, tensor) for a placeholder holding a module's parameter or buffer, or for the
    local part of a DTensor one (`w.to_local()`, as transformers' tensor-parallel layers read their
    weights), else None."""
    if node.op == "call_method" and node.target == "to_local" and isinstance(node.args[0], fx.Node):
        return dynamo_module_tensor(node.args[0])
    if node.op != "placeholder":
        return None
    grapharg = node.meta.get("grapharg")
    tensor = getattr(grapharg, "example", None)
    if not isinstance(tensor, torch.Tensor) or not (isinstance(tensor, torch.nn.Parameter) or _is_buffer(grapharg.source)):
        return None
    return qualified_name(grapharg.source) or node.name, tensor
