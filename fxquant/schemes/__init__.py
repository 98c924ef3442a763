"""The built-in schemes, one plugin per file (the contract: fxquant/scheme.py); importing this
package registers them, in the order `fxquant.SCHEMES` lists them."""

from fxquant.schemes import fp8_rowwise, fp8_blockwise, fp8_tensorwise, int8, nf4, fp4, llm_int8  # noqa: F401  (registers them)
