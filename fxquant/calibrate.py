"""`fxquant.calibrate(model, batches)`: per-layer activation amax for static fp8_tensorwise scales.

    calibration = fxquant.calibrate(model, [(x1,), (x2,)])
    calibration.save("amax.json")
    config = QuantConfig(scheme="fp8_tensorwise", static_activation_amax=Calibration.load("amax.json").amax)

The model runs eagerly under Dynamo with an observer in front of every layer the plan would
quantize (same layer names as the plan), so the recorded names always match the compiled graph's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fxquant.config import QuantConfig
from fxquant.dynamo_params import dynamo_module_tensor
from fxquant.passes import plan_linears
from fxquant.passes.insert_observers import insert_observers


@dataclass
class Calibration:
    """The largest |activation| seen at the input of each layer, over all calibration batches."""

    amax: dict[str, float] = field(default_factory=dict)
    batches: int = 0

    def observe(self, activation: torch.Tensor, layer: str) -> None:
        value = float(activation.detach().abs().amax())
        self.amax[layer] = max(value, self.amax.get(layer, 0.0))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"amax": self.amax, "batches": self.batches}, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        data = json.loads(Path(path).read_text())
        return cls(amax={str(k): float(v) for k, v in data["amax"].items()}, batches=int(data["batches"]))


def calibrate(model: torch.nn.Module, batches: Iterable, config: QuantConfig | None = None) -> Calibration:
    """Run `model` on each batch (a tuple of args, or a dict of kwargs) and record activation amax.

    `config` chooses which layers are observed (skip list, shapes); its scheme only matters for
    the shape rule, fp8_tensorwise by default.
    """
    config = config or QuantConfig(scheme="fp8_tensorwise")
    if config.static_activation_amax is not None:
        raise ValueError("fxquant.calibrate: pass a config without static_activation_amax")
    calibration = Calibration()

    def observing_backend(gm, example_inputs, **_):
        insert_observers(gm, plan_linears(gm, dynamo_module_tensor, config), calibration.observe)
        return gm.forward

    observed = torch.compile(model, backend=observing_backend, dynamic=True)
    with torch.no_grad():
        for batch in batches:
            observed(**batch) if isinstance(batch, dict) else observed(*batch)
            calibration.batches += 1
    return calibration
