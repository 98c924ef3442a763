"""Is a quantized copy still the copy of its parameter? `WeightStamp` records what it was made from.

Four things can change a parameter after its copy was made, each seen by its own test:
    identity   a new Parameter assigned (`layer.weight = nn.Parameter(t)`)
    version    an in-place op on the parameter (`with torch.no_grad(): w.mul_(s)`, `w.copy_(t)`)
    storage    `w.data = t` (the same Parameter, new data, version counter untouched)
    values     an in-place op through `.data` (`w.data.mul_(s)`, `w.data.add_(B @ A)`,
               `torch._foreach_lerp_([w.data], ...)`): `.data` has a version counter of its own, so
               only the values show it. They are sampled: `SAMPLES` elements at fixed positions spread
               over the weight's rows and columns, read through a view (no copy, no kernel) and
               compared exactly (as floats: a NaN differs from everything).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from fxquant.tensor_parallel import local

SAMPLES = 256


class WeightStamp:
    """The parameter a quantized copy was made from (held weakly), its version counter, where its data
    lives, and a sample of its values at that moment."""

    def __init__(self, weight: Tensor):
        self._source = weakref.ref(weight)
        self.version = weight._version
        self.storage = _storage(weight)
        # A view: it reads the weight's values when compared. It also keeps the stamped storage alive,
        # so that data assigned later never reuses its address.
        self.sample = spread_sample(weight)
        self.sampled = self.sample.clone()

    @property
    def source(self) -> Tensor | None:
        return self._source()

    def same_object(self, weight: Tensor) -> bool:
        """Identity, version counter and storage unchanged: what is known without reading values."""
        return weight is self._source() and weight._version == self.version and _storage(weight) == self.storage

    def matches(self, weight: Tensor) -> bool:
        """`weight` is what the copy was made from: the same object, and its sampled values unchanged."""
        return self.same_object(weight) and torch.equal(self.sample, self.sampled)


def _storage(weight: Tensor) -> tuple:
    return weight.data_ptr(), weight.stride()


def spread_sample(weight: Tensor, count: int = SAMPLES) -> Tensor:
    """A 1-D view of up to `count` elements of `weight` (2-D, or 3-D expert weights), at fixed positions
    spread over its rows and columns.

    Laid out densely (contiguous, or with its last two dims swapped: every parameter in practice), the
    weight's storage is read every `step` elements, `step` coprime with its size: each sample in
    another column (or row) and the samples spread evenly over the rows. Otherwise, one sample per
    index of every dim on a diagonal line across the weight (as many as its shortest side allows).
    """
    weight = local(weight.detach())  # a DTensor: this rank's part
    if weight.is_contiguous() or weight.transpose(-2, -1).is_contiguous():
        numel = weight.numel()
        n = min(count, numel)
        step = numel // n
        while math.gcd(step, numel) != 1:
            step -= 1
        start = (numel - (n - 1) * step) // 2
        return weight.as_strided((n,), (step,), weight.storage_offset() + start)
    n = min(count, *weight.shape)
    steps = [size // n for size in weight.shape]
    start = weight.storage_offset() + sum(step // 2 * stride for step, stride in zip(steps, weight.stride()))
    return weight.as_strided((n,), (sum(step * stride for step, stride in zip(steps, weight.stride())),), start)


class SampledValues:
    """Many stamps' samples compared in one go: one concatenation of the views and one comparison per
    device (on CUDA, one synchronization each). The stamped values are concatenated once, again
    only when a stamp is replaced."""

    def __init__(self):
        self._stamps: list[WeightStamp] = []
        self._groups: list[tuple[list[Tensor], Tensor]] = []  # per device: (the views, their stamped values)

    def unchanged(self, stamps: list[WeightStamp]) -> bool:
        """No stamp's sampled values changed since it was made."""
        if len(stamps) != len(self._stamps) or any(a is not b for a, b in zip(stamps, self._stamps)):
            by_device: dict[torch.device, list[WeightStamp]] = {}
            for stamp in stamps:
                by_device.setdefault(stamp.sample.device, []).append(stamp)
            self._stamps = list(stamps)
            self._groups = [([s.sample for s in group], torch.cat([s.sampled for s in group])) for group in by_device.values()]
        return all(torch.equal(torch.cat(views), sampled) for views, sampled in self._groups)
