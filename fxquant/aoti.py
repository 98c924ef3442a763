"""`fxquant.aoti_compile_and_package`: AOTInductor with the Inductor settings the backend compiles with.

    program = fxquant.export(model, (x,))
    package = fxquant.aoti_compile_and_package(program, package_path="model.pt2")
    runner = torch._inductor.aoti_load_package(package)      # in a process that imported fxquant

On CUDA the package runs the kernels the backend generates: each activation quantization fused into
the kernel that produces the activation, the GEMM fxquant's choice (its Triton template, or an extern
kernel called by its op), with fxquant's settings (fxquant/inductor/settings.py: the reference ops'
rounding, whole-row reductions at decode). `torch._inductor.aoti_compile_and_package(program)` after
`import fxquant` fuses the same way, with Inductor's default settings. On the CPU the package calls
fxquant's ops whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.export import ExportedProgram

from fxquant.inductor.compile_settings import compile_settings
from fxquant.inductor.install import install, lowered_on


def aoti_compile_and_package(
    program: ExportedProgram, package_path: str | None = None, inductor_configs: Mapping[str, object] | None = None
) -> str:
    """`torch._inductor.aoti_compile_and_package(program, ...)` under fxquant's settings for a program on
    CUDA; `inductor_configs` win over them. Returns the package's path."""
    install()
    gm = program.graph_module
    inputs = [node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder")]
    with compile_settings(gm, {}, inductor_configs or {}, lowered=lowered_on(inputs)) as configs:
        return torch._inductor.aoti_compile_and_package(program, package_path=package_path, inductor_configs=configs)
