"""fp4: bitsandbytes' FP4 weights (1 sign, 2 exponent, 1 mantissa bits), blocks of 64 along K with
double-quantized absmax, the GEMM in the compute dtype (fxquant/schemes/blockwise_4bit.py)."""

from fxquant.scheme import register_scheme
from fxquant.schemes.blockwise_4bit import Blockwise4bit


class Fp4(Blockwise4bit):
    name = "fp4"
    quant_type = "fp4"


register_scheme(Fp4())
