"""`empty_weights()`: build a model's structure without its float weights, to load a checkpoint into.

    with fxquant.empty_weights():
        model = LlamaForCausalLM(config)           # parameters on meta, buffers real
    fxquant.load_quantized("out", model)

`with torch.device("meta")` would also put non-persistent buffers (rotary frequencies, position
ids) on meta, and no checkpoint holds them. Instead each parameter is moved to meta as a module
registers it, through torch's parameter-registration hook, for the thread inside the block only:
another thread creating modules meanwhile gets real parameters. (A TorchFunctionMode, thread-local
by itself, cannot do this: creating an `nn.Parameter` calls no torch function.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules created inside, in this thread, get their parameters on the meta device and their
    buffers as usual; each parameter exists in real memory only until it is registered."""
    thread = threading.get_ident()

    def on_meta(module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter | None:
        if threading.get_ident() != thread or param.is_meta:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(on_meta)
    try:
        yield
    finally:
        handle.remove()
