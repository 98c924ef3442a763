"""What the built-in schemes share: the GEMM kernels' alignment, FP8's options and fallback, the
per-channel scale's file layout and compressed-tensors' argument groups."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fxquant.log import log_once
from fxquant.ops.availability import fp8_unsupported_reason
from fxquant.scheme import NoHFLayout, Scheme, SchemeCall

# The kernels (FBGEMM, torch._scaled_mm, torch._int_mm) want K and N in multiples of 16.
GEMM_ALIGNMENT = 16


def aligned(n: int, k: int) -> str | None:
    """The GEMM kernels' rule: K and N multiples of 16."""
    for dim, size in (("K", k), ("N", n)):
        if size % GEMM_ALIGNMENT:
            return f"{dim}={size} not divisible by {GEMM_ALIGNMENT}"
    return None


class ScaledWeight(Scheme):
    """A scheme of two tensors, `weight` (low precision, [N, K]) and a float32 `weight_scale`, run by an
    op `(x, w_q, w_scale, bias, ...)`: subclasses give `quantize_pair` and their op."""

    def quantize_pair(self, weight: torch.Tensor, options) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def quantize(self, weight, options):
        w_q, w_scale = self.quantize_pair(weight, options)
        return {"weight": w_q, "weight_scale": w_scale}

    def unsupported(self, layer, n, k, options):
        return aligned(n, k)

    @staticmethod
    def linear_call(op: torch._ops.OpOverload, x, tensors, bias, **constants) -> SchemeCall:
        """The call of an op `(x, w_q, w_scale, bias, **constants)`."""
        args = {"x": x, "w_q": tensors["weight"], "w_scale": tensors["weight_scale"], "bias": bias, **constants}
        return SchemeCall(op, args, {"weight": "w_q", "weight_scale": "w_scale"})

    @staticmethod
    def expert_call(op: torch._ops.OpOverload, x, tensors, **operands) -> SchemeCall:
        """The call of an expert op `(x, w_q, w_scale, <expert_ids or offsets>, **constants)`."""
        args = {"x": x, "w_q": tensors["weight"], "w_scale": tensors["weight_scale"], **operands}
        return SchemeCall(op, args, {"weight": "w_q", "weight_scale": "w_scale"})


def check_scale_ub(ub: float | None) -> float | None:
    """activation_scale_ub: None or a positive number, as a float."""
    if ub is None:
        return None
    if not (isinstance(ub, (int, float)) and ub > 0):
        raise ValueError(f"fxquant: activation_scale_ub must be positive, got {ub!r}")
    return float(ub)


@dataclass(frozen=True)
class Fp8Options:
    """activation_scale_ub: upper bound on an activation amax before its scale is computed (FBGEMM's scale_ub)."""

    activation_scale_ub: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation_scale_ub", check_scale_ub(self.activation_scale_ub))


class Fp8Scheme(ScaledWeight):
    """An FP8 scheme: e4m3 weights, float32 scales; falls back to int8 on a GPU without FP8 tensor cores (logged once)."""

    tensors = {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32}

    def fallback(self, device: torch.device) -> tuple[str, str] | None:
        reason = fp8_unsupported_reason(device)
        if reason is None:
            return None
        log_once(logging.WARNING, f"fxquant: {reason}; falling back from {self.name} to int8")
        return "int8", reason


class PerChannelScale:
    """weight_scale per output channel: [N] for the op, [N, 1] in files (HF's FbgemmFp8Linear layout)."""

    merge_dims = {"weight": 0, "weight_scale": 0}
    shard_dims = {"weight": (0, 1), "weight_scale": (0, None)}

    def file_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape, 1) if name == "weight_scale" and len(shape) == 1 else shape


def ct_args(kind: str, strategy: str, dynamic: bool, **extra) -> dict:
    """One compressed-tensors QuantizationArgs: 8 bits, symmetric."""
    return {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": dynamic, **extra}


def no_bound_in_compressed_tensors(options: Fp8Options) -> None:
    """compressed-tensors has no bound on activation scales: a config with one is refused, not misdescribed."""
    ub = options.activation_scale_ub
    if ub is not None:
        raise NoHFLayout(
            f"fxquant: compressed-tensors cannot record activation_scale_ub={ub:g}: vLLM and transformers would "
            'quantize activations without the bound; save with activation_scale_ub=None, or with hf_format="fbgemm_fp8", '
            "which records it"
        )
