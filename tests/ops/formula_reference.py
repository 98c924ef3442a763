"""The quantizers written again from README's formulas, in float64, for the ops' tests. Nothing here
calls fxquant or torch's float8 casts, so a bug in fxquant's quantizer cannot cancel out of a test.

    FP8:  scale = max(min(amax, ub) / 448, 1 / (448 * 512))     rounded to float32, as FBGEMM computes it
          q     = e4m3(saturate(x / scale))                      the quotient rounded to float32 first
    int8: scale = max(amax, 1e-8) / 127                          rounded to float32
          q     = clamp(round_half_even(x / scale), -127, 127)
"""

from __future__ import annotations

import torch
from torch import Tensor

E4M3_MAX = 448.0
E4M3_MIN_EXPONENT = -6  # the smallest normal binade; below it the spacing stays 2^-9 (subnormals)
E4M3_MANTISSA_BITS = 3
E4M3_EXPONENT_BIAS = 7


def float32(t: Tensor) -> Tensor:
    """`t` rounded to the nearest float32, kept in float64."""
    return t.double().float().double()


def round_to_e4m3(v: Tensor) -> Tensor:
    """float64 `v` saturated to ±448 and rounded to the nearest e4m3 value, ties to even, the sign of zero kept."""
    magnitude = v.abs().clamp(max=E4M3_MAX)
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2^exponent, m in [0.5, 1)
    step = torch.exp2((exponent - 1).clamp(min=E4M3_MIN_EXPONENT).double() - E4M3_MANTISSA_BITS)
    return torch.copysign(torch.round(magnitude / step) * step, v)  # torch.round: half to even


def encode_e4m3(v: Tensor) -> Tensor:
    """The e4m3fn byte (sign, 4 exponent bits, 3 mantissa bits) of each exactly representable float64 value."""
    sign = torch.signbit(v).to(torch.int64) << 7
    magnitude = v.abs()
    _, exponent = torch.frexp(magnitude)
    normal = magnitude >= 2.0**E4M3_MIN_EXPONENT
    unbiased = torch.where(normal, exponent - 1, torch.full_like(exponent, E4M3_MIN_EXPONENT))
    mantissa = magnitude / torch.exp2(unbiased.double()) - normal.double()  # the fraction, without the implicit 1
    exponent_bits = torch.where(normal, unbiased + E4M3_EXPONENT_BIAS, torch.zeros_like(unbiased))
    code = sign | (exponent_bits.to(torch.int64) << E4M3_MANTISSA_BITS) | (mantissa * 2**E4M3_MANTISSA_BITS).to(torch.int64)
    return code.to(torch.uint8)


def fp8_scale(amax: Tensor, scale_ub: float | None) -> Tensor:
    """FBGEMM's scale for a float64 amax (float32 values, held in float64)."""
    if scale_ub is not None:
        amax = torch.minimum(amax, float32(torch.tensor(scale_ub)))
    return torch.maximum(float32(amax / E4M3_MAX), float32(torch.tensor(1 / (E4M3_MAX * 512))))


def quantize_fp8(x: Tensor, dims: tuple[int, ...], scale_ub: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(e4m3 bytes, their float64 values, float64 scale with `dims` kept) for one scale per slice
    of `x` over `dims`."""
    x = x.double()
    scale = fp8_scale(x.abs().amax(dim=dims, keepdim=True), scale_ub)
    values = round_to_e4m3(float32(x / scale))
    return encode_e4m3(values), values, scale


def quantize_fp8_static(x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(e4m3 bytes, float64 values) of `x` divided by a given float32 scale."""
    values = round_to_e4m3(float32(x.double() / scale))
    return encode_e4m3(values), values


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values in float64, float64 scale [..., 1]) with one scale per row (last dim)."""
    x = x.double()
    amax = torch.maximum(x.abs().amax(dim=-1, keepdim=True), float32(torch.tensor(1e-8)))
    scale = float32(amax / 127)
    return torch.round(float32(x / scale)).clamp(-127, 127), scale
