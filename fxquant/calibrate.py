"""`fxquant.calibrate(model, batches)`: per-layer activation amax for static fp8_tensorwise scales.

    calibration = fxquant.calibrate(model, [(x1,), (x2,)])
    calibration.save("amax.json")
    config = QuantConfig(scheme="fp8_tensorwise", static_activation_amax=Calibration.load("amax.json").amax)

The model runs eagerly under Dynamo with an observer in front of every layer the plan would
quantize (same layer names as the plan), so the recorded names always match the compiled graph's.
"""

from __future__ import annotations

import json
import math
import os
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
        """Record `activation`, seen at the input of `layer` in batch number `self.batches`; a NaN or
        Inf is an error, since max() would keep or drop it depending on the batch it came in."""
        value = float(activation.detach().abs().amax())
        if not math.isfinite(value):
            raise ValueError(
                f"fxquant: calibration batch {self.batches}: the input of layer '{layer}' holds a NaN or Inf; "
                "calibrate on finite activations"
            )
        self.amax[layer] = max(value, self.amax.get(layer, 0.0))

    def save(self, path: str | Path) -> None:
        """Write strict JSON (no NaN / Infinity), replacing `path` only once the whole file is written."""
        path = Path(path)
        _check_amax(self.amax, "fxquant: Calibration.save")
        text = json.dumps({"amax": self.amax, "batches": self.batches}, indent=1, sort_keys=True, allow_nan=False)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text)
        os.replace(temporary, path)  # atomic: a reader sees the old file or the new one, never half of one

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a file written by `save`; a malformed file or a non-finite or non-positive amax is an
        error naming the file (and the layer)."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"fxquant: {path}: not JSON ({error})") from error
        if not (isinstance(data, dict) and isinstance(data.get("amax"), dict) and isinstance(data.get("batches"), int)):
            raise ValueError(f'fxquant: {path}: not a calibration file (want {{"amax": {{layer: number}}, "batches": integer}})')
        _check_amax(data["amax"], f"fxquant: {path}")
        return cls(amax={str(k): float(v) for k, v in data["amax"].items()}, batches=data["batches"])


def _check_amax(amax: dict, where: str) -> None:
    """Each amax is a positive finite number, as static scales need."""
    for layer, value in amax.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{where}: layer '{layer}': amax {value!r} is not a positive finite number")


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
