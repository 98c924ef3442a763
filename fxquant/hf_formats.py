"""The quantization_config a quantized checkpoint's config.json carries, in the layouts other tools
read: HF transformers' `fbgemm_fp8` (FbgemmFp8Config) and llm-compressor's compressed-tensors (what
vLLM loads). Each layout's frame is here; each scheme gives its own part (`Scheme.hf_config`):
for fbgemm_fp8 the `activation_scale_ub`, for compressed-tensors the `format` and the `weights` and
`input_activations` argument groups. A layout raises NoHFLayout where it has no equivalent of a
scheme, of an option (an activation bound) or of a quantized layer (transformers' Conv1D). A
checkpoint whose layers mix schemes (per-layer rules) is compressed-tensors' "mixed-precision":
one group per scheme, targeting its layers by name; fbgemm_fp8 describes fp8_rowwise alone."""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

from fxquant.config import QuantConfig
from fxquant.scheme import NoHFLayout, get_scheme

if TYPE_CHECKING:
    from fxquant.passes.plan_linears import Plan

__all__ = ["HF_FORMATS", "NO_ACTIVATION_SCALE_UB", "NoHFLayout", "check_hf_format", "hf_quantization_config"]

# fxquant's activation_scale_ub=None (no bound) in fbgemm_fp8's terms: transformers and vLLM read the
# bound into a float32 tensor and clamp each token's amax to it; float32's largest value clamps nothing
# (FbgemmFp8Config's default, 1200, would clip activations fxquant never clipped).
NO_ACTIVATION_SCALE_UB = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _schemes(plan: Plan, config: QuantConfig, layout: str) -> dict[str, list[str]]:
    """{scheme: its quantized layers} (the config's scheme for a plan without any); NoHFLayout for a
    quantized Conv1D (transformers' fbgemm_fp8 and compressed-tensors convert nn.Linear only: it would
    be read back as float garbage)."""
    conv1d = [entry.layer for entry in plan.rewritten if entry.site.op == "addmm"]
    if conv1d:
        raise NoHFLayout(f"fxquant: {layout} converts nn.Linear only, not the quantized Conv1D {conv1d[0]!r}")
    schemes: dict[str, list[str]] = {}
    for entry in plan.rewritten:
        schemes.setdefault(entry.scheme, []).extend(_module_names(entry))
    return schemes or {config.scheme: []}


def not_converted(name: str, patterns) -> bool:
    """Whether transformers' quantizers leave module `name` as it is under `patterns` (modules_to_not_convert,
    with the model class's `_keep_in_fp32_modules`): its should_convert_module, negated. A pattern
    matches from the start up to a module boundary, as a regex with that boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in patterns)


def _module_names(entry) -> list[str]:
    """The Linear modules HF's layout holds for a plan row: the layer, or each expert's (fxquant/checkpoint_experts.py)."""
    expert = getattr(entry, "expert", None)
    if expert is None:
        return [entry.layer]
    return [part.format(e=e) for e in range(expert.shape[0]) for part in expert.parts]


def fbgemm_fp8_config(plan: Plan, config: QuantConfig) -> dict:
    """HF transformers' FbgemmFp8Config as config.json holds it, for fp8_rowwise.

    Every layer left unquantized, for whatever reason, is in modules_to_not_convert, since
    transformers converts every other nn.Linear.
    """
    experts = [entry.layer for entry in plan.rewritten if entry.site.kind != "linear"]
    if experts:
        raise NoHFLayout(f"fxquant: fbgemm_fp8 converts nn.Linear only, not the expert weight {experts[0]!r}")
    float32 = [entry.layer for entry in plan.rewritten if not_converted(entry.layer, plan.float32_modules)]
    if float32:  # transformers would load its e4m3 codes into a float Linear, unscaled
        raise NoHFLayout(f"fxquant: fbgemm_fp8 leaves {float32[0]!r} float (transformers keeps "
                         f"{list(plan.float32_modules)} in float32), not the quantized layer it is here")
    schemes = _schemes(plan, config, "fbgemm_fp8")
    other = next((scheme for scheme in schemes if scheme != "fp8_rowwise"), None)
    if other is not None:
        raise NoHFLayout(f"fxquant: fbgemm_fp8 describes fp8_rowwise only, not {other}")
    return {
        "quant_method": "fbgemm_fp8",
        **get_scheme("fp8_rowwise").hf_config("fbgemm_fp8", config.options_for("fp8_rowwise")),
        "modules_to_not_convert": [entry.layer for entry in plan.skipped],
    }


def compressed_tensors_config(plan: Plan, config: QuantConfig) -> dict:
    """llm-compressor's compressed-tensors quantization_config (the layout vLLM loads): FP8_DYNAMIC
    for fp8_rowwise, FP8_BLOCK for fp8_blockwise, W8A8 int8; not fp8_tensorwise.

    The stored tensors are already in that layout: `weight` low precision, `weight_scale` [N, 1]
    per channel or [N / bn, K / bk] per block. The layout has no bound on activation scales, so a
    config with activation_scale_ub is refused rather than described as something it is not. A
    checkpoint of one scheme is one group targeting every Linear; one whose layers mix schemes
    (per-layer rules) is a "mixed-precision" config with one group per scheme, targeting its layers
    by name, each with its own format. Expert weights are stored one Linear per expert, as HF
    checkpoints hold them (fxquant/checkpoint_experts.py), and targeted so by name.
    """
    schemes = _schemes(plan, config, "compressed-tensors")
    groups = {}
    for i, (scheme, layers) in enumerate(schemes.items()):
        part = get_scheme(scheme).hf_config("compressed-tensors", config.options_for(scheme))
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(schemes) == 1 else layers, "weights": part["weights"],
                                "input_activations": part["input_activations"], "format": part["format"]}
    formats = {group["format"] for group in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [ignored_module(entry) for entry in plan.skipped],
    }


def ignored_module(entry) -> str:
    """A skipped row as compressed-tensors' `ignore` and bitsandbytes' `llm_int8_skip_modules` name it: its
    module (a raw parameter's, such as an MoE router's `gate.weight`, is its module's: vLLM runs that
    module as a Linear)."""
    return entry.layer.removesuffix(".weight") if entry.site.op == "matmul" else entry.layer


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
