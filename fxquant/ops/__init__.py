"""fxquant's custom ops (`torch.ops.fxquant.*`): schema, fake impl, CPU reference, CUDA impl.

Importing this package registers every op; a saved graph that holds fxquant ops needs it first.
"""

from fxquant.ops import autocast, blockwise_4bit, division, fp8_blockwise, fp8_rowwise, fp8_rowwise_experts, fp8_tensorwise, int8, linear_4bit_partials, linear_common, llm_int8  # noqa: F401  (registers the ops)
