"""nf4: bitsandbytes' NormalFloat4 weights (16 quantiles of N(0, 1)), blocks of 64 along K with
double-quantized absmax, the GEMM in the compute dtype (fxquant/schemes/blockwise_4bit.py)."""

from fxquant.scheme import register_scheme
from fxquant.schemes.blockwise_4bit import Blockwise4bit


class Nf4(Blockwise4bit):
    name = "nf4"
    quant_type = "nf4"


register_scheme(Nf4())
