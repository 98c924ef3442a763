"""fp8_blockwise (DeepSeek-V3): e4m3 weights with one scale per `weight_block_size` block, e4m3
activations with one dynamic scale per token per block-K group (`torch.ops.fxquant.fp8_blockwise_linear`,
fxquant/ops/fp8_blockwise.py; its CUDA lowering: fxquant/inductor/). Expert weights [E, N, K] get one
scale per expert and block, [E, N / bn, K / bk], run by the batched and grouped ops
(fxquant/ops/fp8_blockwise_experts.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.ops import fp8_blockwise_experts  # noqa: F401  (registers the expert ops)
from fxquant.ops.fp8_blockwise import quantize_fp8_blockwise_weight
from fxquant.scheme import register_scheme
from fxquant.schemes.common import GEMM_ALIGNMENT, Fp8Scheme, check_scale_ub, ct_args, no_bound_in_compressed_tensors


@dataclass(frozen=True)
class Fp8BlockwiseOptions:
    """activation_scale_ub: as fp8_rowwise's; weight_block_size: the (N, K) weight block, activations in groups of K."""

    activation_scale_ub: float | None = None
    weight_block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation_scale_ub", check_scale_ub(self.activation_scale_ub))
        block = tuple(self.weight_block_size)
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 and b % GEMM_ALIGNMENT == 0 for b in block):
            raise ValueError(f"fxquant: weight_block_size must be two positive multiples of {GEMM_ALIGNMENT}, got {self.weight_block_size!r}")
        object.__setattr__(self, "weight_block_size", block)


class Fp8Blockwise(Fp8Scheme):
    name = "fp8_blockwise"
    Options = Fp8BlockwiseOptions
    merge_dims = {"weight": 0, "weight_scale": 0}  # the plan's shape rule makes every N whole blocks
    shard_dims = {"weight": (0, 1), "weight_scale": (0, 1)}  # a shard of whole blocks: the plan checks it

    def quantize_pair(self, weight, options):
        return quantize_fp8_blockwise_weight(weight, options.weight_block_size)

    def unsupported(self, layer, n, k, options):
        block_n, block_k = options.weight_block_size
        for dim, size, block in (("K", k, block_k), ("N", n, block_n)):
            if size % block:
                return f"{dim}={size} not a multiple of the {block}-wide weight block"
        return None

    def call(self, layer, x, tensors, bias, options, values=None):
        op = torch.ops.fxquant.fp8_blockwise_linear.default
        return self.linear_call(op, x, tensors, bias, scale_ub=options.activation_scale_ub)

    def call_batched(self, layer, x, tensors, expert_ids, options, values=None):
        op = torch.ops.fxquant.fp8_blockwise_batched_mm.default
        return self.expert_call(op, x, tensors, expert_ids=expert_ids, scale_ub=options.activation_scale_ub)

    def call_grouped(self, layer, x, tensors, offsets, options, values=None):
        op = torch.ops.fxquant.fp8_blockwise_grouped_mm.default
        return self.expert_call(op, x, tensors, offsets=offsets, scale_ub=options.activation_scale_ub)

    def decompositions(self):
        from fxquant.inductor import decompositions

        return {
            torch.ops.fxquant.fp8_blockwise_linear.default: decompositions.fp8_blockwise_linear,
            torch.ops.fxquant.fp8_blockwise_grouped_mm.default: decompositions.fp8_blockwise_grouped_mm,
            torch.ops.fxquant.fp8_blockwise_batched_mm.default: decompositions.fp8_blockwise_batched_mm,
        }

    def cache_key(self, options):
        return options.weight_block_size

    def op_shape(self, name, shape, n, k, options):
        """The op reads the block from the shapes, so a stored scale of any whole block fits; expert
        tensors ([E, ...]) fit as each expert's does."""
        if name == "weight":
            return shape if shape[-2:] == (n, k) and len(shape) in (2, 3) else None
        blocks = shape[-2:]
        fits = len(shape) in (2, 3) and 0 < blocks[0] <= n and 0 < blocks[1] <= k and n % blocks[0] == 0 and k % blocks[1] == 0
        return shape if name == "weight_scale" and fits else None

    def hf_config(self, layout, options):
        if layout == "compressed-tensors":
            no_bound_in_compressed_tensors(options)
            block_n, block_k = options.weight_block_size
            return {"format": "float-quantized",
                    "weights": ct_args("float", "block", False, block_structure=[block_n, block_k]),
                    "input_activations": ct_args("float", "group", True, group_size=block_k)}
        return super().hf_config(layout, options)


register_scheme(Fp8Blockwise())
