"""The quantization_config a quantized checkpoint's config.json carries, in the layouts other tools
read: HF transformers' `fbgemm_fp8` (FbgemmFp8Config) and llm-compressor's compressed-tensors (what
vLLM loads). Each maps fxquant's plan and QuantConfig to that tool's dict, or None where the
layout has no equivalent of the scheme."""

from __future__ import annotations

from fxquant.config import QuantConfig
from fxquant.passes.plan_linears import Plan

# FbgemmFp8Config's default; fxquant's None (no bound) has no fbgemm_fp8 equivalent.
HF_DEFAULT_ACTIVATION_SCALE_UB = 1200.0


def fbgemm_fp8_config(plan: Plan, config: QuantConfig) -> dict | None:
    """HF transformers' FbgemmFp8Config as config.json holds it, for fp8_rowwise; else None.

    Every layer left unquantized, for whatever reason, is in modules_to_not_convert, since
    transformers converts every other nn.Linear.
    """
    if config.scheme != "fp8_rowwise":
        return None
    ub = config.activation_scale_ub
    return {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": HF_DEFAULT_ACTIVATION_SCALE_UB if ub is None else ub,
        "modules_to_not_convert": [entry.layer for entry in plan.skipped],
    }


def _ct_args(kind: str, strategy: str, dynamic: bool, **extra) -> dict:
    return {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": dynamic, **extra}


def compressed_tensors_config(plan: Plan, config: QuantConfig) -> dict | None:
    """llm-compressor's compressed-tensors quantization_config (the layout vLLM loads): FP8_DYNAMIC
    for fp8_rowwise, FP8_BLOCK for fp8_blockwise, W8A8 int8; None for fp8_tensorwise.

    The stored tensors are already in that layout: `weight` low precision, `weight_scale` [N, 1]
    per channel or [N / bn, K / bk] per block.
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
        return None
    storage, weights, activations = groups[config.scheme]
    return {
        "quant_method": "compressed-tensors",
        "format": storage,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "ignore": [entry.layer for entry in plan.skipped],
    }


HF_FORMATS = {"fbgemm_fp8": fbgemm_fp8_config, "compressed-tensors": compressed_tensors_config}
