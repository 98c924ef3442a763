"""Golden-graph helpers: run fxquant's passes on the graph Dynamo captures, without Inductor."""

from __future__ import annotations

import json
import re
import zipfile

import torch

import fxquant


def normalized_code(gm: torch.fx.GraphModule) -> str:
    """`gm.code` made stable and short: no type annotations, no `x = None` frees, short parameter names."""
    code = gm.code.strip()
    code = re.sub(r";\s+(\w+ = )+None", "", code)
    code = re.sub(r" : [\w.]+", "", code)
    code = re.sub(r"\b[lL]_(self|fn|m)_", "", code)
    code = code.replace("modules_", "").replace("parameters_", "")
    lines = [line.rstrip() for line in code.splitlines() if line.strip()]
    return "\n".join(line for line in lines if not re.fullmatch(r"\s*(\w+) = \1", line, re.IGNORECASE))


def rewrite(model: torch.nn.Module, *args, config: fxquant.QuantConfig | None = None, **kwargs):
    """(normalized rewritten graph, its eager output, plan) for `model(*args, **kwargs)`.

    The rewritten graph runs eagerly, so its output is the ops' CPU reference applied in the
    places the passes chose; compare it with the unquantized model's output. Without a config the
    graphs are fp8_rowwise's (what the default, "auto", chooses on FP8 GPUs; on this CPU it would be int8).
    """
    backend = fxquant.Backend(config or fxquant.QuantConfig(scheme="fp8_rowwise"), keep_graphs=True)

    def capture(gm, example_inputs, **_):
        backend.rewrite(gm)
        return gm.forward

    with torch.no_grad():
        output = torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(*args, **kwargs)
    (gm,), (plan,) = backend.graphs, backend.plans
    return normalized_code(gm), output, plan




def aoti_package_calls(package: str) -> list[str]:
    """The ops an AOTInductor package calls through its proxy executor (custom ops such as fxquant's)."""
    with zipfile.ZipFile(package) as archive:
        return [
            node["node"]["target"]
            for name in archive.namelist() if name.endswith("wrapper.json")
            for node in json.loads(archive.read(name))["nodes"]
        ]
