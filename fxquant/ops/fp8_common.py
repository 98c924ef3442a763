"""What every FP8 scheme shares: the e4m3 format, FBGEMM's scale rule, the saturating cast.

    scale = max(min(amax, scale_ub) / 448, 1 / (448 * 512))        float32, correctly rounded
    x_q   = saturate_e4m3(x / scale)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fxquant.ops.division import div_rn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # FBGEMM's guard: an all-zero row gets this scale


def fp8_scale(amax: Tensor, scale_ub: float | None = None) -> Tensor:
    """FBGEMM's scale for a float32 amax. The division is done in float64 so that it is correctly
    rounded on every device (PyTorch's CUDA division by a Python scalar multiplies by the
    reciprocal, one ulp off for most values, while FBGEMM's kernel divides)."""
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    return (amax.double() / FP8_MAX).float().clamp(min=FP8_MIN_SCALE)


def fp8_static_scale(amax: float, scale_ub: float | None = None) -> float:
    """fp8_scale for one calibrated amax, as a Python float (folded into graphs as a constant)."""
    return float(fp8_scale(torch.tensor(amax, dtype=torch.float32), scale_ub))


def saturate_to_fp8(x: Tensor, scale: Tensor | float) -> Tensor:
    """e4m3(x / scale), clamped to ±448 first (values beyond an upper-bounded scale saturate)."""
    if not isinstance(scale, Tensor):
        # CUDA divides by a Python number as a product with its reciprocal, not correctly rounded.
        scale = x.new_full((), scale, dtype=torch.float32)
    return div_rn(x.float(), scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@functools.cache
def device_scalar(value: float, device: torch.device) -> Tensor:
    """A float32 0-dim tensor on `device`, made once (kernels read scales from device memory)."""
    return torch.tensor(value, dtype=torch.float32, device=device)
