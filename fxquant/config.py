"""QuantConfig: what the user asks for, validated once, hashable for caches.

`torch.compile(model, backend="fxquant", options={...})` hands its `options` dict to
`QuantConfig.from_options`; everything downstream reads only this frozen object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

SCHEMES = ("fp8_rowwise", "fp8_blockwise", "fp8_tensorwise", "int8")

# The kernels (FBGEMM, torch._scaled_mm, torch._int_mm) want K and N in multiples of 16.
GEMM_ALIGNMENT = 16


@dataclass(frozen=True)
class QuantConfig:
    """How fxquant quantizes a model's linear layers.

    Args:
        scheme: "fp8_rowwise" (e4m3 weights per output channel, e4m3 activations per token,
            dynamic); "fp8_blockwise" (DeepSeek-V3: e4m3 weights per `weight_block_size` block,
            activations per token per block-K group, dynamic); "fp8_tensorwise" (one scale per
            weight and one per activation tensor: dynamic, or static from `static_activation_amax`);
            "int8" (int8 symmetric, per channel and per token, int32 accumulation).
        skip: glob patterns (fnmatch) over layer names, e.g. "lm_head" or "*.gate". A layer's
            name is its module path ("layers.0.mlp.down_proj"); a bare parameter used in a
            matmul is named by its own path ("blocks.0.w"). Skipped layers run unchanged.
        activation_scale_ub: FP8 only. Upper bound on the per-token amax before the scale is
            computed (FBGEMM's `scale_ub`), so outlier tokens cannot flatten the others.
        weight_block_size: fp8_blockwise's (N, K) weight block; activations are quantized in
            groups of K along the input dimension. Layers whose N or K is not a multiple are skipped.
        static_activation_amax: fp8_tensorwise only: per-layer activation amax from
            `fxquant.calibrate`; the activation scales and their products with the weight scales
            are folded into constants. Layers without an entry are skipped.
        min_weight_numel: layers whose weight has fewer elements stay unquantized; tiny GEMMs
            gain nothing from quantization.
        check_weight_updates: re-quantize a weight that was changed or replaced after
            compilation (in place, through `.data`, or a new Parameter), detected through its
            identity, version counter, storage and a sample of its values
            (fxquant/weight_stamp.py). Costs one small comparison per call (on CUDA, one wait
            for the GPU: benchmarks/weight_check.py); turn off only for frozen weights.
        merge_parallel_linears: when compiling, layers that read the same activation (Llama's
            q/k/v and gate/up projections) run as one GEMM on their weights stacked along N, as
            vLLM's merged linear layers do; the weights are held once. Exported programs keep
            one GEMM per layer (the layout checkpoints are written from).
    """

    scheme: str = "fp8_rowwise"
    skip: tuple[str, ...] = ("lm_head",)
    activation_scale_ub: float | None = None
    weight_block_size: tuple[int, int] = (128, 128)
    static_activation_amax: tuple[tuple[str, float], ...] | None = None
    min_weight_numel: int = 0
    check_weight_updates: bool = True
    merge_parallel_linears: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"fxquant: unknown scheme {self.scheme!r}; valid schemes: {', '.join(SCHEMES)}")
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        if not all(isinstance(pattern, str) for pattern in skip):
            raise ValueError(f"fxquant: skip must be a list of glob strings, got {self.skip!r}")
        object.__setattr__(self, "skip", skip)
        ub = self.activation_scale_ub
        if ub is not None:
            if not self.scheme.startswith("fp8"):
                raise ValueError(f"fxquant: activation_scale_ub applies to FP8 schemes, not {self.scheme!r}")
            if not ub > 0:
                raise ValueError(f"fxquant: activation_scale_ub must be positive, got {ub!r}")
            object.__setattr__(self, "activation_scale_ub", float(ub))
        block = tuple(self.weight_block_size)
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 and b % GEMM_ALIGNMENT == 0 for b in block):
            raise ValueError(f"fxquant: weight_block_size must be two positive multiples of {GEMM_ALIGNMENT}, got {self.weight_block_size!r}")
        object.__setattr__(self, "weight_block_size", block)
        if self.static_activation_amax is not None:
            if self.scheme != "fp8_tensorwise":
                raise ValueError(f"fxquant: static_activation_amax applies to fp8_tensorwise, not {self.scheme!r}")
            amax = dict(self.static_activation_amax)
            bad = {layer: value for layer, value in amax.items() if not (isinstance(value, (int, float)) and 0 < value < float("inf"))}
            if bad:
                raise ValueError(f"fxquant: static_activation_amax values must be positive and finite: {bad}")
            object.__setattr__(self, "static_activation_amax", tuple(sorted((k, float(v)) for k, v in amax.items())))
        if self.min_weight_numel < 0:
            raise ValueError(f"fxquant: min_weight_numel must be >= 0, got {self.min_weight_numel}")

    @classmethod
    def from_options(cls, options: Mapping[str, object] | None) -> QuantConfig:
        """Parse `torch.compile(..., options={...})`; unknown keys are an error listing the known ones."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"fxquant: unknown option(s) {', '.join(unknown)}; known options: {', '.join(known)}")
        return cls(**options)

    def cache_key(self) -> str:
        """A stable digest of every field, for compiled-graph caches."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

