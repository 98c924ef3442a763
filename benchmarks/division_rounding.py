"""What correctly rounded division costs the fused FP8 quantization (fxquant/inductor/settings.py turns
Inductor's `eager_numerics.division_rounding` on so the compiled quantizer rounds x / scale as FBGEMM
does; Triton's float32 `/` is approximate).

RMSNorm → fp8_rowwise linear compiled with fxquant's lowering, with the setting off and on, each
twice in alternation; GPU time of CUDA-graph replays (triton's do_bench_cudagraph, no host time).

    python benchmarks/division_rounding.py --json $OUT/division_rounding.json      # GPU only
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench_cudagraph

import fxquant  # noqa: F401  (registers the ops)
from fxquant.inductor.settings import DIVISION_ROUNDING
from fxquant.ops.fp8_rowwise import quantize_fp8_rowwise

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_llama import compile_with_fxquant_settings  # noqa: E402  (the repository's benchmark helpers)

CASES = [(1, 4096), (16, 4096), (1000, 4096), (4096, 4096), (1000, 14336)]  # (M, K); N = 4096


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = {k: quantize_fp8_rowwise(torch.randn(4096, k, device="cuda") / k**0.5) for k in {k for _, k in CASES}}
    norms = {k: torch.ones(k, device="cuda", dtype=torch.bfloat16) for k in weights}
    us: dict[str, dict[bool, list[float]]] = {}
    for rounding in (False, True, False, True):
        for m, k in CASES:
            torch._dynamo.reset()
            (w_q, w_scale), norm = weights[k], norms[k]
            fn = compile_with_fxquant_settings(lambda t: torch.ops.fxquant.fp8_rowwise_linear(rms_norm(t, norm), w_q, w_scale, None, None),
                                                {DIVISION_ROUNDING: rounding})
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            fn(x)
            us.setdefault(f"M={m} K={k}", {}).setdefault(rounding, []).append(do_bench_cudagraph(lambda: fn(x), rep=200) * 1e3)
    print(f"{'RMSNorm -> fp8 linear, N=4096':30s} {'approximate / µs':>18s} {'rounded / µs':>18s} {'ratio':>6s}")
    rows = []
    for label, by in us.items():
        ratio = min(by[True]) / min(by[False])
        rows.append({"case": label, "approximate_us": by[False], "rounded_us": by[True], "ratio": ratio})
        print(f"{label:30s} {by[False][0]:8.2f} {by[False][1]:8.2f} {by[True][0]:8.2f} {by[True][1]:8.2f} {ratio:6.3f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
