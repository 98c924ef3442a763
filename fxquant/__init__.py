"""fxquant: quantization as a compiler pass.

    model = torch.compile(model, backend="fxquant")                              # FP8 rowwise W8A8
    model = torch.compile(model, backend="fxquant", options={"scheme": "int8"})
    print(fxquant.plan(model, example_input))
"""

from fxquant import ops, schemes  # noqa: F401  (registers torch.ops.fxquant.* and the built-in schemes)
from fxquant.aoti import aoti_compile_and_package
from fxquant.backend import Backend, backend
from fxquant.bnb_checkpoints import load_bitsandbytes, save_bitsandbytes
from fxquant.calibrate import Calibration, calibrate
from fxquant.checkpoint import load_quantized, memory_footprint, save_quantized
from fxquant.config import QuantConfig
from fxquant.empty_weights import empty_weights
from fxquant.explain import plan
from fxquant.export import export, load_program
from fxquant.inductor.install import install
from fxquant.passes import Plan
from fxquant.quantize_inplace import quantize_
from fxquant.quantized_copies import quantized_copies, release
from fxquant.scheme import SCHEMES, Scheme, SchemeCall, register_scheme, unregister_scheme

install()  # fxquant's decompositions in Inductor's own table: every compile of its ops on CUDA fuses

__version__ = "0.1.0"
__all__ = [
    "SCHEMES", "Backend", "Calibration", "Plan", "QuantConfig", "Scheme", "SchemeCall", "aoti_compile_and_package",
    "backend", "calibrate", "empty_weights", "export", "load_bitsandbytes", "load_program", "load_quantized",
    "memory_footprint", "plan", "quantize_", "quantized_copies", "register_scheme", "release", "save_bitsandbytes",
    "save_quantized", "unregister_scheme",
]
