"""The Inductor settings fxquant compiles its CUDA graphs with, on top of the compile mode's.

    emulate_precision_casts    True   quantize each activation as eager rounds it (bf16), so the
                                      compiled model matches the reference ops' numerics
    realize_opcount_threshold  100    decode-shaped graphs only (at most DECODE_TOKENS tokens per
                                      linear layer): Inductor's 30 counts the emulated casts (two
                                      ops per bf16 rounding) and so stores rotate_half(k) * sin to
                                      memory, one more kernel per decoder layer; 60 fuses it into
                                      the attention-input copy as in the bf16 model for Llama, 100
                                      also for Qwen3's q_norm / k_norm before the rotation (two
                                      kernels fewer a layer, Llama's unchanged: benchmarks/
                                      kernel_count.py). With thousands of tokens that copy
                                      recomputes it per query head of the group, and 30 stays
                                      (1.4 % less GPU time at prefill)
    split_reductions           False  without CUDA graphs: a decode forward is bound by kernel
                                      launches, and SiLU·mul's 14336-wide row amax split over three
                                      kernels costs two more launches per layer than it saves on the
                                      GPU. Under CUDA graphs: decode-shaped graphs only (one
                                      looped kernel was faster than the three, 5.0 vs 5.5 µs)
    inductor_choices_class     WholeRowReductions (fxquant/inductor/choices.py), decode-shaped
                                      graphs only: RMSNorm + quantization rows up to the GPU's
                                      whole_row_limit (8192 on the H100; inductor/tuning.py) as
                                      persistent reductions (the row read once); the backend
                                      installs it as Inductor's choices handler while compiling
Division is left as Inductor's default (`eager_numerics.division_rounding` off): the quantization's
x / scale is fxquant::div_rn, correctly rounded by its own lowering (fxquant/inductor/division.py).
Measured in benchmarks/RESULTS.md (sixth to eighth sessions). A user's `inductor` settings
(`fxquant.backend(..., inductor={...})`) come last and win.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import fx
from torch._inductor import config as inductor_config

from fxquant.inductor.choices import WholeRowReductions
from fxquant.passes.find_sites import fake_value

DECODE_TOKENS = 16
DECODE_REALIZE_OPCOUNT_THRESHOLD = 100
EXPERT_ARGUMENTS = {"offsets", "expert_ids"}  # what an expert op's schema has (grouped, batched)


def uses_cudagraphs(mode_patches: Mapping[str, object]) -> bool:
    """Whether the compile mode (or Inductor's global config) runs the graph under CUDA graphs."""
    return bool(mode_patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs))


def linear_tokens(gm: fx.GraphModule) -> int | None:
    """The most tokens (rows) any of `gm`'s fxquant linear layers sees, from Dynamo's example values
    (a dynamic size counts as the value it was traced with); None without fxquant layers. Expert ops
    (grouped, batched) see each token once per expert it is routed to, so they count only in a graph
    without other fxquant layers: a Qwen3-MoE forward at (16, 1) is decode-shaped, 16 tokens."""
    dense, experts = [], []
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "fxquant":
            x = fake_value(node.args[0])
            sizes = None if x is None else [size if isinstance(size, int) else size.node.hint for size in x.shape[:-1]]
            if sizes is None or None in sizes:  # no example value, or an unbacked size: not decode-shaped
                return None
            arguments = {argument.name for argument in node.target._schema.arguments}
            (experts if arguments & EXPERT_ARGUMENTS else dense).append(math.prod(sizes))
    return max(dense or experts, default=None)


def fxquant_inductor_settings(mode_patches: Mapping[str, object], tokens: int | None = None) -> dict[str, object]:
    """Inductor config patches for a graph fxquant lowered whose linear layers see at most `tokens`
    tokens (None: unknown): the mode's, then fxquant's (above)."""
    settings = {**mode_patches, "emulate_precision_casts": True}
    decode_shaped = tokens is not None and tokens <= DECODE_TOKENS
    if decode_shaped:
        settings["realize_opcount_threshold"] = DECODE_REALIZE_OPCOUNT_THRESHOLD
        settings["inductor_choices_class"] = WholeRowReductions
    if decode_shaped or not uses_cudagraphs(mode_patches):
        settings["split_reductions"] = False
    return settings
