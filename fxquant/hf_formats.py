"""The quantization_config a quantized checkpoint's config.json carries, in the layouts other tools
read: HF transformers' `fbgemm_fp8` (FbgemmFp8Config) and llm-compressor's compressed-tensors (what
vLLM loads). Each maps fxquant's plan and QuantConfig to that tool's dict, or raises NoHFLayout
where the layout has no equivalent of the scheme, of its activation bound or of a quantized layer
(transformers' Conv1D)."""

from __future__ import annotations

import contextlib

from fxquant.config import QuantConfig
from fxquant.passes.plan_linears import Plan

# fxquant's activation_scale_ub=None (no bound) in fbgemm_fp8's terms: transformers and vLLM read the
# bound into a float32 tensor and clamp each token's amax to it; float32's largest value clamps nothing
# (FbgemmFp8Config's default, 1200, would clip activations fxquant never clipped).
NO_ACTIVATION_SCALE_UB = 3.4028234663852886e38  # torch.finfo(torch.float32).max


class NoHFLayout(ValueError):
    """The layout cannot describe this checkpoint: its scheme, its activation bound or a quantized layer."""


def _check_only_linear(plan: Plan, layout: str) -> None:
    """transformers' fbgemm_fp8 and compressed-tensors convert nn.Linear only: a quantized Conv1D (GPT-2)
    would be read back as float garbage."""
    conv1d = [entry.layer for entry in plan.rewritten if entry.site.kind == "addmm"]
    if conv1d:
        raise NoHFLayout(f"fxquant: {layout} converts nn.Linear only, not the quantized Conv1D {conv1d[0]!r}")


def fbgemm_fp8_config(plan: Plan, config: QuantConfig) -> dict:
    """HF transformers' FbgemmFp8Config as config.json holds it, for fp8_rowwise.

    Every layer left unquantized, for whatever reason, is in modules_to_not_convert, since
    transformers converts every other nn.Linear.
    """
    if config.scheme != "fp8_rowwise":
        raise NoHFLayout(f"fxquant: fbgemm_fp8 describes fp8_rowwise only, not {config.scheme}")
    _check_only_linear(plan, "fbgemm_fp8")
    ub = config.activation_scale_ub
    return {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": NO_ACTIVATION_SCALE_UB if ub is None else ub,
        "modules_to_not_convert": [entry.layer for entry in plan.skipped],
    }


def _ct_args(kind: str, strategy: str, dynamic: bool, **extra) -> dict:
    return {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": dynamic, **extra}


def compressed_tensors_config(plan: Plan, config: QuantConfig) -> dict:
    """llm-compressor's compressed-tensors quantization_config (the layout vLLM loads): FP8_DYNAMIC
    for fp8_rowwise, FP8_BLOCK for fp8_blockwise, W8A8 int8; not fp8_tensorwise.

    The stored tensors are already in that layout: `weight` low precision, `weight_scale` [N, 1]
    per channel or [N / bn, K / bk] per block. The layout has no bound on activation scales, so a
    config with activation_scale_ub is refused rather than described as something it is not.
    """
    block_n, block_k = config.weight_block_size
    groups = {
        "fp8_rowwise": ("float-quantized", _ct_args("float", "channel", False), _ct_args("float", "token", True)),
        "fp8_blockwise": (
            "float-quantized",
            _ct_args("float", "block", False, block_structure=[block_n, block_k]),
            _ct_args("float", "group", True, group_size=block_k),
        ),
        "int8": ("int-quantized", _ct_args("int", "channel", False), _ct_args("int", "token", True)),
    }
    if config.scheme not in groups:
        raise NoHFLayout(f"fxquant: compressed-tensors has no dynamic {config.scheme} layout")
    _check_only_linear(plan, "compressed-tensors")
    if config.activation_scale_ub is not None:
        raise NoHFLayout(
            f"fxquant: compressed-tensors cannot record activation_scale_ub={config.activation_scale_ub:g}: vLLM and "
            "transformers would quantize activations without the bound; save with activation_scale_ub=None, or with "
            'hf_format="fbgemm_fp8", which records it'
        )
    storage, weights, activations = groups[config.scheme]
    return {
        "quant_method": "compressed-tensors",
        "format": storage,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "ignore": [entry.layer for entry in plan.skipped],
    }


HF_FORMATS = {"fbgemm_fp8": fbgemm_fp8_config, "compressed-tensors": compressed_tensors_config}


def check_hf_format(hf_format: str | None) -> None:
    if hf_format is not None and hf_format != "auto" and hf_format not in HF_FORMATS:
        raise ValueError(f"fxquant: unknown hf_format {hf_format!r}; known: auto, {', '.join(HF_FORMATS)}, None")


def hf_quantization_config(hf_format: str | None, plan: Plan, config: QuantConfig) -> dict | None:
    """config.json's quantization_config in `hf_format` (NoHFLayout, a ValueError, where that layout
    cannot describe the checkpoint); for "auto" in the first layout that can, else None; None for None."""
    check_hf_format(hf_format)
    if hf_format != "auto":
        return None if hf_format is None else HF_FORMATS[hf_format](plan, config)
    for layout in HF_FORMATS.values():
        with contextlib.suppress(NoHFLayout):
            return layout(plan, config)
    return None
