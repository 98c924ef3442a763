"""Probe (GPU): the 2-16-row nf4 kernel's dequantization, three ways, against bf16 F.linear and the op.

    op      fxquant::linear_4bit as committed (codes by tl.gather from a float32 table, times the
            absmax per element, rounded to bf16, then the MMA)
    gather  codes by tl.gather from a bf16 table, the MMA per absmax block, the absmax applied to
            the MMA's [BLOCK_N, 16] result (no multiply per weight element)
    prmt    as gather, the lookup by PTX `prmt` byte permutes (inline assembly: 8 codes a 32-bit
            register, about four instructions a code, elementwise, so Triton may move the MMA
            operand's layout conversion onto the packed bytes)

CUDA-graph kernel time (benchmarks/gemm.py's bench), Llama-3-8B shapes, M = 4 and 16, a few tiles;
the error is the largest relative to float64 of the same dequantized weight.

    python benchmarks/probe_4bit_lut.py [--m 4 16] [--layers qkv o gate_up down]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

import fxquant  # noqa: F401  (registers the ops)
from benchmarks.gemm import LLAMA3_8B, bench
from fxquant.ops.blockwise_4bit import NESTED_BLOCKSIZE, _dynamic_map, code_table, dequantize_4bit, quantize_4bit


def prmt_asm(values: torch.Tensor) -> str:
    """PTX mapping a 32-bit register of 4 packed bytes (8 codes, the even one in each high nibble)
    to 4 bf16 pairs: $0 $1 the even codes' values, $2 $3 the odd ones'. The 16 bf16 values' high
    and low bytes are two 16-byte tables; `prmt` picks 4 bytes of 8 by 3-bit selectors, so each
    byte plane takes two permutes (codes 0-7, 8-15) and a third choosing by the code's bit 3."""
    bits = values.to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
    planes = {"h": (bits >> 8) & 0xFF, "l": bits & 0xFF}
    words = {f"{p}{i}": sum(int(planes[p][4 * i + j]) << (8 * j) for j in range(4)) for p in planes for i in range(4)}

    def lookup(nibbles: str, out0: str, out1: str) -> str:
        return f"""
        shr.b32 t, {nibbles}, 4; or.b32 t, t, {nibbles}; prmt.b32 s, t, t, 0x0020;
        and.b32 s7, s, 0x7777; shr.b32 s2, s, 1; and.b32 s2, s2, 0x4444; or.b32 s2, s2, 0x3210;
        prmt.b32 a, h0, h1, s7; prmt.b32 b, h2, h3, s7; prmt.b32 hb, a, b, s2;
        prmt.b32 a, l0, l1, s7; prmt.b32 b, l2, l3, s7; prmt.b32 lb, a, b, s2;
        prmt.b32 {out0}, lb, hb, 0x5140; prmt.b32 {out1}, lb, hb, 0x7362;"""

    movs = " ".join(f"mov.b32 {name}, {value:#010x};" for name, value in words.items())
    return ("{ .reg .b32 lo, hi, t, s, s7, s2, a, b, hb, lb, h0, h1, h2, h3, l0, l1, l2, l3; " + movs
            + " and.b32 lo, $4, 0x0F0F0F0F; shr.b32 hi, $4, 4; and.b32 hi, hi, 0x0F0F0F0F;"
            + lookup("hi", "$0", "$1") + lookup("lo", "$2", "$3") + " }")


@triton.jit
def _probe_kernel(
    x_ptr, w_ptr, absmax_q_ptr, nested_ptr, offset_ptr, table_ptr, dynamic_map_ptr, out_ptr, M, N, K,
    K_PER_SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRMT: tl.constexpr, ASM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    SUB: tl.constexpr = BLOCK_K if BLOCK_K <= BLOCKSIZE else BLOCKSIZE  # one absmax block
    rj = tl.arange(0, SUB // 2)
    mask_n = rn < N
    mask_m = rm < M
    offset = tl.load(offset_ptr)
    table = tl.load(table_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, K_PER_SPLIT, BLOCK_K):
        for g in tl.static_range(BLOCK_K // SUB):
            k0 = pid_k * K_PER_SPLIT + step + g * SUB
            byte = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rj)[None, :], mask=mask_n[:, None], other=0)
            block = rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE
            absmax_q = tl.load(absmax_q_ptr + block, mask=mask_n, other=0).to(tl.int32)
            absmax = tl.load(dynamic_map_ptr + absmax_q) * tl.load(nested_ptr + block // NESTED, mask=mask_n, other=0.0) + offset
            if PRMT:
                even, odd = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [byte], dtype=(tl.bfloat16, tl.bfloat16),
                                                      is_pure=True, pack=4)
            else:
                even = tl.reshape(tl.gather(table, tl.reshape((byte >> 4).to(tl.int32), (BLOCK_N * SUB // 2,)), 0), (BLOCK_N, SUB // 2))
                odd = tl.reshape(tl.gather(table, tl.reshape((byte & 0xF).to(tl.int32), (BLOCK_N * SUB // 2,)), 0), (BLOCK_N, SUB // 2))
            x_even = tl.load(x_ptr + rm[None, :] * K + (k0 + 2 * rj)[:, None], mask=mask_m[None, :], other=0.0)
            x_odd = tl.load(x_ptr + rm[None, :] * K + (k0 + 2 * rj + 1)[:, None], mask=mask_m[None, :], other=0.0)
            part = tl.dot(even, x_even)
            part = tl.dot(odd, x_odd, part)
            acc += part * absmax[:, None]
    tl.store(out_ptr + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=mask_n[:, None] & mask_m[None, :])


def probe(x, tensors, blocksize, block_n, splits, prmt, warps, stages, asm):
    m, k = x.shape
    w_q = tensors["weight"]
    n = w_q.shape[0]
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    table = code_table("nf4").to(device=x.device, dtype=torch.bfloat16)
    _probe_kernel[(triton.cdiv(n, block_n), splits)](
        x, w_q, tensors["weight_absmax"], tensors["weight_nested_absmax"], tensors["weight_offset"].reshape(1), table,
        _dynamic_map(x.device), partial, m, n, k, K_PER_SPLIT=k // splits, BLOCKSIZE=blocksize, NESTED=NESTED_BLOCKSIZE,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, PRMT=prmt, ASM=asm, num_warps=warps, num_stages=stages,
    )
    return partial.sum(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--layers", nargs="+", default=list(LLAMA3_8B))
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    asm = prmt_asm(code_table("nf4"))
    for name in args.layers:
        n, k = LLAMA3_8B[name]
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        tensors = quantize_4bit(weight, 64, "nf4")
        arguments = (*(tensors[t] for t in ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset")), "nf4", 64)
        dequantized = dequantize_4bit(*arguments[:4], "nf4", 64).double()
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            expected = x.double() @ dequantized.t()

            def error(out):
                return ((out.double() - expected).abs().max() / expected.abs().max()).item()

            bf16_ms = bench(lambda: torch.nn.functional.linear(x, weight))
            op_ms = bench(lambda: torch.ops.fxquant.linear_4bit(x, *arguments))
            print(f"== {name} M={m}: bf16 {bf16_ms * 1e3:.1f} us; op {op_ms * 1e3:.1f} us ({bf16_ms / op_ms:.2f}x)"
                  f" err {error(torch.ops.fxquant.linear_4bit(x, *arguments)):.4f}", flush=True)
            rows = []
            for prmt, block_n, splits, warps, stages in itertools.product((False, True), (64, 128), (2, 4, 8, 16), (4,), (3,)):
                config = (("prmt" if prmt else "gather"), block_n, splits, warps, stages)
                try:
                    run = lambda: probe(x, tensors, 64, block_n, splits, prmt, warps, stages, asm)  # noqa: E731
                    err = error(run())
                    rows.append((bench(run), err, config))
                except Exception as failure:  # noqa: BLE001  (a probe: report and go on)
                    print(f"   {config} failed: {type(failure).__name__}: {str(failure)[:300]}", flush=True)
            for ms, err, config in sorted(rows)[:6]:
                print(f"   {ms * 1e3:7.1f} us  {bf16_ms / ms:5.2f}x  err {err:.4f}  {config}", flush=True)
            for kind in ("gather", "prmt"):
                best = min((row for row in rows if row[2][0] == kind), default=None)
                if best:
                    print(f"   best {kind}: {bf16_ms / best[0]:.2f}x {best[2]}", flush=True)


if __name__ == "__main__":
    main()
