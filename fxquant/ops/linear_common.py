"""What every fxquant linear op shares: input checks, output shape, and the inference-only autograd.

The ops compute y = x @ dequant(w_q).T + bias for x of shape [..., K] and a quantized weight
w_q of shape [N, K] with one float32 scale per output channel (w_scale, shape [N]).
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_linear_inputs(
    op: str, x: Tensor, w_q: Tensor, w_scale: Tensor | None, scale_shape: tuple, bias: Tensor | None
) -> None:
    """Shape and dtype checks, symbolic-shape friendly (used by the fake and the real impls)."""
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{op}: activation dtype {x.dtype} unsupported; want {FLOAT_DTYPES}")
    torch._check(w_q.dim() == 2, lambda: f"{op}: weight must be 2-D [N, K], got {tuple(w_q.shape)}")
    torch._check(
        x.shape[-1] == w_q.shape[1],
        lambda: f"{op}: activation has K={x.shape[-1]} but the weight is [N={w_q.shape[0]}, K={w_q.shape[1]}]",
    )
    if w_scale is not None:
        torch._check(
            w_scale.dtype == torch.float32 and tuple(w_scale.shape) == tuple(scale_shape),
            lambda: f"{op}: weight scale must be float32 {list(scale_shape)}, got {w_scale.dtype} {list(w_scale.shape)}",
        )
    if bias is not None:
        torch._check(bias.shape == (w_q.shape[0],), lambda: f"{op}: bias must be [N={w_q.shape[0]}], got {tuple(bias.shape)}")


def linear_output(x: Tensor, w_q: Tensor) -> Tensor:
    """An empty [..., N] output in the activation's dtype (the fake impls' result)."""
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def gemm_output(op: str, x_q: Tensor, w_q: Tensor) -> Tensor:
    """An empty bf16 [M, N] output for a GEMM op on quantized x_q [M, K] and w_q [N, K] (the fake impls')."""
    torch._check(x_q.dim() == 2 and x_q.shape[1] == w_q.shape[1], lambda: f"{op}: x_q must be [M, K={w_q.shape[1]}]")
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=torch.bfloat16)


def bf16_gemm_epilogue(y: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """A GEMM's bf16 [M, N] output + bias (in the wider of the two dtypes), in x's dtype and batch shape."""
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def dequantized_epilogue(
    acc: Tensor, x_scale: Tensor | None, w_scale: Tensor | None, bias: Tensor | None, x: Tensor
) -> Tensor:
    """acc [M, N] (fp32/int32) * x_scale [M] * w_scale [N] (None: already applied) + bias, in x's dtype and batch shape."""
    y = acc.float()
    if x_scale is not None:
        y = y * x_scale.unsqueeze(-1)
    if w_scale is not None:
        y = y * w_scale.unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("fxquant::backward_not_supported", mutates_args=())
def backward_not_supported(grad: Tensor, input_shape: list[int], op: str) -> Tensor:
    """Runs in place of a gradient: fxquant's quantized layers are inference-only."""
    raise RuntimeError(
        f"fxquant: backward through a quantized layer ({op}) is not supported; quantized layers are "
        "inference-only. Run under torch.no_grad(), skip the layer (options={'skip': [...]}), or train "
        "the unquantized model."
    )


@backward_not_supported.register_fake
def _(grad: Tensor, input_shape: list[int], op: str) -> Tensor:
    return grad.new_empty(input_shape)


def register_inference_only_autograd(
    op: torch.library.CustomOpDef, name: str, activation: str = "x", bias: str = "bias"
) -> None:
    """Give `op` an autograd formula whose backward raises at run time.

    Without one, torch.compile fails at compile time whenever an input requires grad (the usual
    case for inference without no_grad). The error is deferred to an op that runs only if a
    backward actually happens; it is never a silent zero gradient. `activation` and `bias` name the
    op's arguments that may need a gradient (found by name in its schema, not by position).
    """
    arguments = [argument.name for argument in op._opoverload._schema.arguments]
    positions = [arguments.index(activation), *([arguments.index(bias)] if bias in arguments else [])]

    def setup_context(ctx, inputs, output):
        ctx.shapes = {i: None if inputs[i] is None else list(inputs[i].shape) for i in positions if i < len(inputs)}

    def backward(ctx, grad):
        # The dispatcher drops trailing arguments left at their defaults, so size by needs_input_grad.
        grads = [None] * len(ctx.needs_input_grad)
        for position, shape in ctx.shapes.items():
            if position < len(grads) and ctx.needs_input_grad[position]:
                grads[position] = backward_not_supported(grad, shape, name)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
