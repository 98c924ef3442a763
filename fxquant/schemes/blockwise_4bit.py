"""What nf4 and fp4 share: bitsandbytes' 4-bit blockwise weights with double-quantized absmax, run
by `torch.ops.fxquant.linear_4bit` (fxquant/ops/blockwise_4bit.py). Weight-only: the activation
stays in the compute dtype.

Tensors, in the op's layout and in files: `weight` uint8 [N, K / 2] (two codes a byte, as
bitsandbytes packs them), `weight_absmax` uint8 [N, K / blocksize] (the block absmax's 8-bit codes),
`weight_nested_absmax` float32 [ceil(N K / blocksize / 256)] and `weight_offset` float32 [] (the
absmax's mean). Their bytes are bitsandbytes' own (quantize_4bit with compress_statistics=True), so
fxquant/bnb_checkpoints.py writes and reads transformers' bitsandbytes layout from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fxquant.ops.blockwise_4bit import BLOCKSIZES, COMPUTE_DTYPES, NESTED_BLOCKSIZE, quantize_4bit
from fxquant.scheme import Scheme, SchemeCall

# The scheme's tensor → the op's argument.
OP_ARGUMENTS = {"weight": "w_q", "weight_absmax": "absmax_q", "weight_nested_absmax": "nested_absmax", "weight_offset": "offset"}


@dataclass(frozen=True)
class Blockwise4bitOptions:
    """blocksize: weights per absmax, along K (bitsandbytes' 32 .. 4096; 64 as in transformers);
    compute_dtype: "bfloat16", "float16" or "float32" for the dequantized GEMM, None: the activation's."""

    blocksize: int = 64
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"fxquant: 4-bit blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"fxquant: compute_dtype must be None or one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")


class Blockwise4bit(Scheme):
    """A bitsandbytes 4-bit scheme; subclasses set `name` and `quant_type` ("nf4" or "fp4")."""

    quant_type: ClassVar[str]
    tensors = {"weight": torch.uint8, "weight_absmax": torch.uint8, "weight_nested_absmax": torch.float32,
               "weight_offset": torch.float32}
    Options = Blockwise4bitOptions
    packed_weight = True

    def quantize(self, weight, options):
        if weight.dim() != 2 or weight.shape[1] % options.blocksize:
            raise ValueError(f"fxquant: {self.name} quantizes [N, K] weights with K a multiple of the blocksize "
                             f"{options.blocksize}, got {list(weight.shape)}")
        return quantize_4bit(weight, options.blocksize, self.quant_type)

    def layout(self, n, k, options):
        blocks = k // options.blocksize
        return {"weight": (torch.uint8, (n, k // 2)), "weight_absmax": (torch.uint8, (n, blocks)),
                "weight_nested_absmax": (torch.float32, (-(-n * blocks // NESTED_BLOCKSIZE),)),
                "weight_offset": (torch.float32, ())}

    def op_shape(self, name, shape, n, k, options):
        """File and op shapes are one. A stored layer's K is read from its weight, which holds K / 2
        bytes a row: a shape fits [N, K] or, so read, [N, 2 K]."""
        fits = any(self.layout(n, size, options)[name][1] == shape for size in (k, 2 * k) if size % options.blocksize == 0)
        return shape if fits else None

    def stored_problem(self, tensors, n, k, options):
        weight = tensors.get("weight")
        if weight is not None and weight.dim() == 2:
            k = 2 * weight.shape[1]  # the packed weight's K / 2 bytes a row
        return super().stored_problem(tensors, n, k, options)

    def unsupported(self, layer, n, k, options):
        if k % options.blocksize:
            return f"K={k} not divisible by the 4-bit blocksize {options.blocksize}"
        return None

    def call(self, layer, x, tensors, bias, options, values=None):
        args = {"x": x, **{OP_ARGUMENTS[name]: tensors[name] for name in OP_ARGUMENTS}, "quant_type": self.quant_type,
                "blocksize": options.blocksize, "compute_dtype": options.compute_dtype, "bias": bias}
        return SchemeCall(torch.ops.fxquant.linear_4bit.default, args, OP_ARGUMENTS)

    def decompositions(self):
        from fxquant.inductor import decompositions_4bit

        return {torch.ops.fxquant.linear_4bit.default: decompositions_4bit.linear_4bit}

    def cache_key(self, options):
        return options.blocksize  # the compute dtype changes the call, not the quantized tensors
