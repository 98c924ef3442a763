"""One compile's Inductor settings, as the backend and AOTInductor apply them.

    with compile_settings(gm, mode_patches, user_patches, lowered=True) as config_patches:
        compile_fx(gm, example_inputs, config_patches=config_patches)      # or aoti_compile_and_package

The config patches are the compile mode's, then fxquant's where the graph's ops are lowered
(fxquant/inductor/settings.py, by the most tokens a linear layer of `gm` sees), then the user's,
which win. Inside, where `gm` holds fxquant's ops, the cache tag names fxquant's lowering sources
and what they chose on this machine (fxquant/inductor/cache_key.py),
and a choices class among the patches (`inductor_choices_class`) is Inductor's choices handler:
Inductor reads that config once per thread, so a per-graph class is installed as the handler
instead, and its uuid joins the cache tag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import fx
from torch._inductor.virtualized import V

from fxquant.inductor.cache_key import cache_key_tag, holds_fxquant_ops
from fxquant.inductor.settings import fxquant_inductor_settings, linear_tokens


@contextlib.contextmanager
def compile_settings(
    gm: fx.GraphModule, mode_patches: Mapping[str, object], user_patches: Mapping[str, object], *, lowered: bool
) -> Iterator[dict[str, object]]:
    """Yields the config patches for compiling `gm` (whose fxquant ops are lowered or not), with its cache
    tag and choices handler set until the block ends."""
    patches = dict(mode_patches)
    if lowered:
        patches = fxquant_inductor_settings(patches, linear_tokens(gm))
    cache_tag = cache_key_tag() if holds_fxquant_ops(gm) else torch.compiler.config.cache_key_tag
    patches = {**patches, **user_patches}
    choices_class = patches.pop("inductor_choices_class", None)
    choices = choices_class() if choices_class is not None else None
    if choices is not None:
        cache_tag = f"{cache_tag}|choices:{choices.uuid()}"
    handler = contextlib.nullcontext() if choices is None else V.set_choices_handler(choices)
    with torch.compiler.config.patch(cache_key_tag=cache_tag), handler:
        yield patches
