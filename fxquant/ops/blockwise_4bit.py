"""4-bit blockwise weights as bitsandbytes makes them (NF4, FP4), with its double quantization.

    absmax[b]  = max |W| over block b (blocksize consecutive elements of the row-major weight)
    code(w)    = the nearest of 16 values (the NF4 or FP4 table) to w * (1 / absmax[b])
    packed     = two codes a byte, the even element in the high nibble
    double quantization of absmax (blocks of 256, bitsandbytes' `compress_statistics`):
    offset     = mean(absmax);  absmax_q, nested_absmax = 8-bit dynamic-map blockwise(absmax - offset)
    dequantized absmax = DYNAMIC_MAP[absmax_q] * nested_absmax[b // 256] + offset

Codes, absmax codes, nested absmax and offset are bit-identical to `bitsandbytes.functional.
quantize_4bit(w, blocksize, compress_statistics=True, quant_type)` on the CPU (tests/ops/
test_blockwise_4bit.py checks it against the package). The op `fxquant::linear_4bit` dequantizes
(in float32, as bitsandbytes does) and multiplies in the compute dtype; on CUDA up to 16 activation
rows run fused dequantize-GEMM Triton kernels (fxquant/kernels/gemm_4bit.py, through the op
fxquant::linear_4bit_partials of fxquant/ops/linear_4bit_partials.py), more rows dequantize
with one Triton kernel (fxquant/kernels/dequantize_4bit.py) and run cuBLAS.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fxquant.ops.linear_common import FLOAT_DTYPES, register_inference_only_autograd

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' valid 4-bit block sizes
NESTED_BLOCKSIZE = 256  # bitsandbytes' block of absmax values in double quantization
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# bitsandbytes.functional.get_4bit_type: NF4 in value order; FP4 (1 sign, 2 exponent, 1 mantissa
# bits, bias 2) in bit-pattern order, divided by its largest magnitude, 12.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def code_table(quant_type: str) -> Tensor:
    """The 16 float32 values a 4-bit code stands for (bitsandbytes' quant_map)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        values = torch.tensor([*FP4_MAGNITUDES, *(-m for m in FP4_MAGNITUDES)], dtype=torch.float32)
        return values / values.abs().max()
    raise ValueError(f"fxquant: 4-bit quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted float32 values,
    the code of double-quantized absmax (its nested_quant_map)."""
    data: list[float] = []
    for i in range(7):  # max_exponent_bits = 7, total_bits = 8, signed
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _tables(quant_type: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(code table, its sorted midpoints, the sort order) on `device`."""
    code = code_table(quant_type).to(device)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return code, midpoints, order


@functools.cache
def _dynamic_map(device: torch.device) -> Tensor:
    return dynamic_map().to(device)


def quantize_4bit_codes(weight: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """4-bit codes [N, K] (uint8, 0..15) and float32 absmax [N, K / blocksize] of a weight [N, K]
    whose K is a multiple of `blocksize`: bitsandbytes' quantize_4bit arithmetic (CPU)."""
    _, midpoints, order = _tables(quant_type, weight.device)
    n, k = weight.shape
    blocks = weight.float().contiguous().reshape(n, k // blocksize, blocksize)  # a Conv1D's weight comes transposed
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
    codes = torch.bucketize(scaled, midpoints, out_int32=True)
    if quant_type != "nf4":
        codes = order[codes]  # FP4's table is in bit-pattern order
    return codes.to(torch.uint8).reshape(n, k), absmax


def pack_4bit(codes: Tensor) -> Tensor:
    """Two codes a byte along the last dim, the even one in the high nibble: [..., K] → [..., K / 2]."""
    return (codes[..., ::2] << 4) | codes[..., 1::2]


def unpack_4bit(packed: Tensor) -> Tensor:
    """The codes of `pack_4bit`: [..., K / 2] uint8 → [..., K] int64."""
    pairs = torch.stack([packed >> 4, packed & 0xF], dim=-1).to(torch.int64)
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


LUT_SIZE = 65536  # bitsandbytes' CPU quantize_blockwise: normalized values first go to one of 65536 bins


@functools.cache
def _dynamic_map_lut(device: torch.device) -> Tensor:
    """bitsandbytes' CPU lookup table (csrc/cpu_ops.cpp, build_quantize_lut): bin i, the value
    -1 + 2 i / 65535, gets the dynamic-map code of the first midpoint not below it."""
    table = _dynamic_map(device)
    midpoints = 0.5 * (table[:-1] + table[1:])
    bins = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32, device=device)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, bins).to(torch.uint8)


def quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization: (absmax_q uint8 like absmax, nested_absmax float32 [ceil(blocks / 256)],
    offset float32 []) as bitsandbytes' quantize_blockwise(absmax - mean, blocksize=256) on the CPU:
    each value times the reciprocal of its block's absmax, rounded to one of 65536 bins, whose code is
    the nearest dynamic-map value to the bin (a block of zeros: codes 0)."""
    offset = absmax.mean()
    flat = (absmax - offset).reshape(-1)
    count = flat.numel()
    blocks = F.pad(flat, (0, -count % NESTED_BLOCKSIZE)).reshape(-1, NESTED_BLOCKSIZE)
    nested = blocks.abs().amax(dim=-1)
    reciprocal = torch.where(nested > 0, 1.0 / nested, torch.zeros_like(nested))  # no NaN bins for a zero block
    normed = torch.clamp(blocks * reciprocal.unsqueeze(-1), -1, 1)
    bins = ((normed + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _dynamic_map_lut(absmax.device)[bins].masked_fill((nested == 0).unsqueeze(-1), 0)
    return codes.reshape(-1)[:count].reshape(absmax.shape), nested, offset


def dequantize_absmax(absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor) -> Tensor:
    """float32 absmax from its double quantization (bitsandbytes' dequantize_blockwise + offset)."""
    flat = absmax_q.reshape(-1).long()
    values = _dynamic_map(absmax_q.device)[flat]
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: flat.numel()]
    return (values * scale + offset).reshape(absmax_q.shape)


def quantize_4bit(weight: Tensor, blocksize: int, quant_type: str) -> dict[str, Tensor]:
    """The scheme tensors of a weight [N, K]: packed codes [N, K / 2], absmax codes [N, K / blocksize],
    nested absmax [ceil(N K / blocksize / 256)] and offset []."""
    codes, absmax = quantize_4bit_codes(weight, blocksize, quant_type)
    absmax_q, nested, offset = quantize_absmax(absmax)
    return {"weight": pack_4bit(codes), "weight_absmax": absmax_q, "weight_nested_absmax": nested, "weight_offset": offset}


def dequantize_4bit(w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor,
                    quant_type: str, blocksize: int) -> Tensor:
    """The float32 weight [N, K] of packed codes [N, K / 2] and double-quantized absmax."""
    code = _tables(quant_type, w_q.device)[0]
    absmax = dequantize_absmax(absmax_q, nested_absmax, offset)
    n = w_q.shape[0]
    values = code[unpack_4bit(w_q)].reshape(n, -1, blocksize)
    return (values * absmax.unsqueeze(-1)).reshape(n, -1)


def compute_dtype_of(x: Tensor, compute_dtype: str | None) -> torch.dtype:
    return x.dtype if compute_dtype is None else COMPUTE_DTYPES[compute_dtype]


def check_4bit_inputs(x: Tensor, w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor,
                      quant_type: str, blocksize: int, compute_dtype: str | None, bias: Tensor | None) -> None:
    op = "fxquant::linear_4bit"
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{op}: activation dtype {x.dtype} unsupported; want {FLOAT_DTYPES}")
    torch._check(quant_type in QUANT_TYPES, lambda: f"{op}: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    torch._check(compute_dtype is None or compute_dtype in COMPUTE_DTYPES,
                 lambda: f"{op}: compute_dtype must be None or one of {list(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    torch._check(w_q.dtype == torch.uint8 and w_q.dim() == 2, lambda: f"{op}: packed weight must be uint8 [N, K / 2]")
    n, k = w_q.shape[0], w_q.shape[1] * 2
    torch._check(x.shape[-1] == k, lambda: f"{op}: activation has K={x.shape[-1]} but the packed weight holds K={k}")
    torch._check(k % blocksize == 0, lambda: f"{op}: K={k} is not a multiple of blocksize {blocksize}")
    torch._check(absmax_q.dtype == torch.uint8 and tuple(absmax_q.shape) == (n, k // blocksize),
                 lambda: f"{op}: absmax codes must be uint8 [{n}, {k // blocksize}], got {absmax_q.dtype} {list(absmax_q.shape)}")
    nested = -(-n * (k // blocksize) // NESTED_BLOCKSIZE)
    torch._check(nested_absmax.dtype == torch.float32 and tuple(nested_absmax.shape) == (nested,),
                 lambda: f"{op}: nested absmax must be float32 [{nested}], got {nested_absmax.dtype} {list(nested_absmax.shape)}")
    torch._check(offset.dtype == torch.float32 and offset.numel() == 1, lambda: f"{op}: offset must be one float32")
    if bias is not None:
        torch._check(bias.shape == (n,), lambda: f"{op}: bias must be [N={n}], got {tuple(bias.shape)}")


def linear_4bit_reference(x: Tensor, w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor,
                          quant_type: str, blocksize: int, compute_dtype: str | None = None,
                          bias: Tensor | None = None) -> Tensor:
    """bitsandbytes' Linear4bit: the weight dequantized in float32, cast to the compute dtype, times
    x cast to it, + bias; the result in x's dtype."""
    dtype = compute_dtype_of(x, compute_dtype)
    weight = dequantize_4bit(w_q, absmax_q, nested_absmax, offset.reshape(()), quant_type, blocksize).to(dtype)
    return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype)).to(x.dtype)


@torch.library.custom_op("fxquant::linear_4bit", mutates_args=())
def linear_4bit(x: Tensor, w_q: Tensor, absmax_q: Tensor, nested_absmax: Tensor, offset: Tensor,
                quant_type: str, blocksize: int, compute_dtype: str | None = None,
                bias: Tensor | None = None) -> Tensor:
    """y = x @ dequantize_4bit(w_q, ...).T + bias in the compute dtype (None: x's), in x's dtype."""
    check_4bit_inputs(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, compute_dtype, bias)
    return linear_4bit_reference(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, compute_dtype, bias)


@linear_4bit.register_fake
def _(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, compute_dtype=None, bias=None):
    check_4bit_inputs(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, compute_dtype, bias)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@linear_4bit.register_kernel("cuda")
def _(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, compute_dtype=None, bias=None):
    """Up to 16 rows (decode): the fused dequantize-GEMM kernels; more: the weight dequantized by one
    Triton kernel, then cuBLAS."""
    check_4bit_inputs(x, w_q, absmax_q, nested_absmax, offset, quant_type, blocksize, compute_dtype, bias)
    from fxquant.kernels import dequantize_4bit as dequantize_kernel, gemm_4bit
    from fxquant.ops.linear_4bit_partials import linear_from_partials

    rows = x.numel() // x.shape[-1]
    dtype = compute_dtype_of(x, compute_dtype)
    if gemm_4bit.fits(rows):
        partials = torch.ops.fxquant.linear_4bit_partials(x.reshape(rows, -1).to(dtype), w_q, absmax_q, nested_absmax, offset, quant_type, blocksize)
        y = linear_from_partials(partials, dtype, bias)
    else:
        tables = (_tables(quant_type, w_q.device)[0], _dynamic_map(w_q.device))
        weight = dequantize_kernel.dequantize_4bit(w_q, absmax_q, nested_absmax, offset.reshape(1), *tables, blocksize, dtype)
        y = F.linear(x.reshape(rows, -1).to(dtype), weight, None if bias is None else bias.to(dtype))
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


register_inference_only_autograd(linear_4bit, "fxquant::linear_4bit")
