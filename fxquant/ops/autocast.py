"""Autocast for fxquant's linear ops: under `torch.autocast` they follow aten::linear's rule.

    with torch.autocast("cpu", torch.bfloat16):  fxquant.fp8_rowwise_linear(x_fp32, w_q, w_scale, b_fp32)
        →  fxquant.fp8_rowwise_linear(x.to(bf16), w_q, w_scale, b.to(bf16))   autocast off inside: a bf16 result

Like eager's cast of linear's arguments to the autocast dtype, the activation and the bias are cast
(floating tensors on the autocast device, float64 excepted); the quantized weight and its float32
scales are the low-precision operands already and stay as they are. Registered on the Autocast
dispatch keys, so the eager op, AOTAutograd's trace of a compiled graph and exported programs run
under a caller's autocast all follow it; a region with autocast disabled is left alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxquant.ops import blockwise_4bit, fp8_blockwise, fp8_rowwise, fp8_tensorwise, int8, llm_int8  # noqa: F401  (define the ops)

# Every built-in linear op: its activation is the argument "x", its bias "bias".
LINEAR_OPS = ("fp8_rowwise_linear", "fp8_blockwise_linear", "fp8_tensorwise_linear", "fp8_tensorwise_static_linear", "int8_linear",
              "linear_4bit", "llm_int8_linear")
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
CAST_ARGUMENTS = ("x", "bias")

_library = torch.library.Library("fxquant", "IMPL")


def _autocast_cast(value: object, device_type: str, dtype: torch.dtype) -> object:
    """`value` as eager autocast casts a lower-precision op's argument."""
    eligible = (
        isinstance(value, Tensor) and value.is_floating_point() and value.device.type == device_type
        and value.dtype != torch.float64
    )
    return value.to(dtype) if eligible else value


def _autocast_kernel(op: torch._ops.OpOverload, device_type: str):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, AUTOCAST_KEYS[device_type]))
    positions = [i for i, argument in enumerate(op._schema.arguments) if argument.name in CAST_ARGUMENTS]

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [_autocast_cast(a, device_type, dtype) if i in positions else a for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast)

    return kernel


for _name in LINEAR_OPS:
    for _device_type, _key in AUTOCAST_KEYS.items():
        _library.impl(_name, _autocast_kernel(getattr(torch.ops.fxquant, _name).default, _device_type), _key)
