"""QuantConfig: what the user asks for, validated once, hashable for caches.

`torch.compile(model, backend="fxquant", options={...})` hands its `options` dict to
`QuantConfig.from_options`; everything downstream reads only this frozen object.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fxquant.ops.availability import cpu_int8_slow_reason, fp8_unsupported_reason
from fxquant.scheme import SCHEMES, get_scheme

# A rule: (glob over layer names, scheme or None for "leave it unquantized").
Rule = tuple[str, "str | None"]

# The default scheme: FP8 rowwise where FP8 GEMMs run fast (GPUs of compute capability >= 8.9), int8
# on older GPUs and on CPUs with int8 dot products, float (no quantization) on other CPUs; checkpoints,
# being device-independent, take FP8 (auto_scheme).
AUTO = "auto"
AUTO_CHOICES = ("fp8_rowwise", "int8")


def auto_scheme(device: torch.device | None) -> tuple[str | None, str]:
    """The scheme "auto" means on `device` (None: leave the layer as it is), and why. `device` None: for a
    checkpoint (`save_quantized`, `fxquant quantize`, `quantize_`), which must not depend on the machine
    that made it, and whose use is serving on GPUs, where FP8 is the format transformers and vLLM load
    (older GPUs fall back to int8 on load)."""
    if device is None:
        return "fp8_rowwise", "stored weights are device-independent, made for GPUs with FP8"
    if device.type == "cuda":
        reason = fp8_unsupported_reason(device)
        if reason is not None:
            return "int8", reason
        major, minor = torch.cuda.get_device_capability(device)
        return "fp8_rowwise", f"sm_{major}{minor} has FP8 tensor cores"
    if device.type == "cpu" and (reason := cpu_int8_slow_reason()) is not None:
        return None, reason
    return "int8", f"no FP8 GEMMs on {device.type}"


class Decision(NamedTuple):
    """The config's word on one layer: a scheme (None: unquantized), which field said so ("rules",
    "skip" or "scheme"), the glob that matched, and why, where "auto" chose the scheme."""

    scheme: str | None
    source: str
    pattern: str | None
    auto: str | None = None

    @property
    def note(self) -> str:
        """The plan's note: "rule '*.down_proj'", "skipped by rule (lm_head)", "skipped by skip list (lm_head)",
        "auto -> int8: no FP8 GEMMs on cpu", "auto -> unquantized: <the CPU> has no int8 dot-product ...", ""."""
        auto = f"auto -> {self.scheme or 'unquantized'}: {self.auto}" if self.auto else ""
        if self.source == "rules":
            rule = f"rule {self.pattern!r}" if self.scheme else f"skipped by rule ({self.pattern})"
            return "; ".join(filter(None, [rule, auto]))
        return f"skipped by skip list ({self.pattern})" if self.source == "skip" else auto


@dataclass(frozen=True)
class QuantConfig:
    """How fxquant quantizes a model's linear layers.

    Args:
        scheme: the scheme of every layer no rule decides: "auto" (the default: "fp8_rowwise" on GPUs of
            compute capability >= 8.9, "int8" on older GPUs and on CPUs with int8 dot products (VNNI,
            AMX), unquantized on other CPUs, decided per weight's device when compiling; "fp8_rowwise"
            in checkpoints and `quantize_`, see `auto_scheme`; the plan notes the choice and why), or
            one of `fxquant.SCHEMES`: "fp8_rowwise" (e4m3 weights per output channel, e4m3 activations
            per token, dynamic); "fp8_blockwise" (DeepSeek-V3: e4m3 weights per `weight_block_size`
            block, activations per token per block-K group, dynamic); "fp8_tensorwise" (one scale per weight and one per activation
            tensor: dynamic, or static from `static_activation_amax`); "int8" (int8 symmetric, per
            channel and per token, int32 accumulation); or a registered plugin (fxquant/scheme.py).
        skip: glob patterns (fnmatch) over layer names, e.g. "lm_head" or "*.gate". A layer's
            name is its module path ("layers.0.mlp.down_proj"); a bare parameter used in a
            matmul is named by its own path ("blocks.0.w"). Skipped layers run unchanged.
        activation_scale_ub: FP8 only. Upper bound on the per-token amax before the scale is
            computed (FBGEMM's `scale_ub`), so outlier tokens cannot flatten the others.
        weight_block_size: fp8_blockwise's (N, K) weight block; activations are quantized in
            groups of K along the input dimension. Layers whose N or K is not a multiple are skipped.
        static_activation_amax: fp8_tensorwise only: per-layer activation amax from
            `fxquant.calibrate`; the activation scales and their products with the weight scales
            are folded into constants. Layers without an entry are skipped.
        min_weight_numel: layers whose weight has fewer elements stay unquantized; tiny GEMMs
            gain nothing from quantization.
        check_weight_updates: re-quantize a weight that was changed or replaced after
            compilation (in place, through `.data`, or a new Parameter), detected through its
            identity, version counter, storage and a sample of its values
            (fxquant/weight_stamp.py). Costs one small comparison per call (on CUDA, one wait
            for the GPU: benchmarks/weight_check.py); turn off only for frozen weights.
        merge_parallel_linears: when compiling, layers that read the same activation (Llama's
            q/k/v and gate/up projections) run as one GEMM on their weights stacked along N, as
            vLLM's merged linear layers do; the weights are held once. Exported programs keep
            one GEMM per layer (the layout checkpoints are written from).
        rules: per-layer schemes: (glob, scheme or None) pairs, or a dict in that order, e.g.
            {"*.experts.*": "fp8_blockwise", "*.down_proj": "int8", "lm_head": None}. The first rule
            whose glob matches a layer decides it (None: left unquantized) and wins over `skip` and
            `scheme`, which decide the layers no rule matches. The plan names the deciding rule.
        scheme_options: options of schemes by name, {"my_scheme": {"group_size": 64}}: each scheme
            declares its options (its `Options` dataclass). activation_scale_ub, weight_block_size
            and static_activation_amax are options of the built-in schemes, given once for every
            scheme that declares them; a scheme's entry here wins over them.
    """

    scheme: str = AUTO
    skip: tuple[str, ...] = ("lm_head",)
    activation_scale_ub: float | None = None
    weight_block_size: tuple[int, int] = (128, 128)
    static_activation_amax: tuple[tuple[str, float], ...] | None = None
    min_weight_numel: int = 0
    check_weight_updates: bool = True
    merge_parallel_linears: bool = True
    rules: tuple[Rule, ...] = ()
    scheme_options: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()

    def __post_init__(self) -> None:
        _check_scheme(self.scheme)
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        if not all(isinstance(pattern, str) for pattern in skip):
            raise ValueError(f"fxquant: skip must be a list of glob strings, got {self.skip!r}")
        object.__setattr__(self, "skip", skip)
        object.__setattr__(self, "rules", _rules(self.rules))
        object.__setattr__(self, "scheme_options", _scheme_options(self.scheme_options))
        for name in _SHARED_OPTIONS:
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        in_use = self.schemes_in_use()
        for name in _SHARED_OPTIONS:
            declaring = [s for s in SCHEMES if name in SCHEMES[s].option_names()]
            if _DEFAULTS[name] is None and getattr(self, name) is not None and not set(declaring) & set(in_use):
                raise ValueError(f"fxquant: {name} applies to {', '.join(declaring)}, not {', '.join(map(repr, in_use))}")
        for scheme in in_use:  # each scheme validates (and normalizes) its options
            options = self.options_for(scheme)
            for name in SCHEMES[scheme].option_names():
                if name in _SHARED_OPTIONS and name not in dict(self.scheme_options).get(scheme, {}):
                    object.__setattr__(self, name, getattr(options, name))
        if self.min_weight_numel < 0:
            raise ValueError(f"fxquant: min_weight_numel must be >= 0, got {self.min_weight_numel}")

    def schemes_in_use(self) -> tuple[str, ...]:
        """`scheme` and the schemes rules name, each once ("auto": each scheme it may choose)."""
        named = [self.scheme, *(scheme for _, scheme in self.rules if scheme is not None)]
        return tuple(dict.fromkeys(chosen for scheme in named for chosen in (AUTO_CHOICES if scheme == AUTO else (scheme,))))

    def resolved(self, device: torch.device | None = None) -> QuantConfig:
        """This config with "auto" (its `scheme`, its rules') replaced by the scheme it means on `device`
        (None: for a checkpoint), as checkpoints record it. Where "auto" leaves layers as they are (a CPU
        without int8 dot products), a last rule ("*", None) says so and `scheme` takes the checkpoints' choice."""
        chosen = auto_scheme(device)[0]

        def concrete(scheme):
            return chosen if scheme == AUTO else scheme

        rules = tuple((p, concrete(s)) for p, s in self.rules)
        if self.scheme == AUTO and chosen is None:
            return dataclasses.replace(self, scheme=auto_scheme(None)[0], rules=(*rules, ("*", None)))
        return dataclasses.replace(self, scheme=concrete(self.scheme), rules=rules)

    def options_for(self, scheme: str) -> object:
        """`scheme`'s Options: its entry in `scheme_options`, else the field of this config of the same
        name (activation_scale_ub, ...), else the option's default."""
        known = get_scheme(scheme).option_names()
        given = dict(dict(self.scheme_options).get(scheme, ()))
        shared = {name: getattr(self, name) for name in known if name in _SHARED_OPTIONS and name not in given}
        return get_scheme(scheme).options({**shared, **given})

    def given_options(self, scheme: str) -> set[str]:
        """The names of `scheme`'s options this config sets: its `scheme_options` entry's, and the
        fields of the same name (activation_scale_ub, ...) set to other than their defaults."""
        given = set(dict(dict(self.scheme_options).get(scheme, ())))
        shared = [name for name in get_scheme(scheme).option_names() if name in _SHARED_OPTIONS]
        return given | {name for name in shared if getattr(self, name) != _frozen(_DEFAULTS[name])}

    def decide(self, layer: str, device: torch.device | None = None) -> Decision:
        """What the config asks for `layer`: the first rule whose glob matches it, else the skip list's
        first match (no scheme), else `scheme`; "auto" as it resolves on `device` (None: for a checkpoint)."""
        decision = self._decide(layer)
        if decision.scheme != AUTO:
            return decision
        scheme, why = auto_scheme(device)
        return decision._replace(scheme=scheme, auto=why)

    def _decide(self, layer: str) -> Decision:
        for pattern, scheme in self.rules:
            if fnmatch.fnmatchcase(layer, pattern):
                return Decision(scheme, "rules", pattern)
        for pattern in self.skip:
            if fnmatch.fnmatchcase(layer, pattern):
                return Decision(None, "skip", pattern)
        return Decision(self.scheme, "scheme", None)

    @classmethod
    def from_options(cls, options: Mapping[str, object] | None) -> QuantConfig:
        """Parse `torch.compile(..., options={...})`; unknown keys are an error listing the known ones."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"fxquant: unknown option(s) {', '.join(unknown)}; known options: {', '.join(known)}")
        return cls(**options)

    def cache_key(self) -> str:
        """A stable digest of every field, for compiled-graph caches."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Options of the built-in schemes as fields of QuantConfig, shared by every scheme that declares one.
_SHARED_OPTIONS = ("activation_scale_ub", "weight_block_size", "static_activation_amax")
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(QuantConfig)}


def _check_scheme(name: str) -> None:
    """"auto" or a registered scheme; anything else is an error listing them."""
    if name != AUTO and name not in SCHEMES:
        raise ValueError(f"fxquant: unknown scheme {name!r}; valid schemes: {', '.join([AUTO, *SCHEMES])}")


def _frozen(value: object) -> object:
    """A value as a config holds it, hashable: a mapping as sorted (key, value) pairs, lists as tuples."""
    if isinstance(value, Mapping):
        return tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    return value


def _rules(rules: object) -> tuple[Rule, ...]:
    """Rules as (glob, scheme or None) pairs, from a dict or a sequence of pairs; each scheme registered."""
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs):
        raise ValueError(f"fxquant: rules must map glob strings to schemes (or None), got {rules!r}")
    for _, scheme in pairs:
        if scheme is not None:
            _check_scheme(scheme)
    return tuple((pattern, scheme) for pattern, scheme in pairs)


def _scheme_options(options: object) -> tuple:
    """{scheme: {option: value}} (or its pairs, as fxquant.json holds it) as sorted, hashable pairs."""
    try:
        per_scheme = dict(options)
        per_scheme = {scheme: dict(values) for scheme, values in per_scheme.items()}
    except (TypeError, ValueError):
        raise ValueError(f"fxquant: scheme_options must map scheme names to option maps, got {options!r}") from None
    for scheme, values in per_scheme.items():
        get_scheme(scheme).options({name: _frozen(value) for name, value in values.items()})
    return tuple(sorted((scheme, _frozen(values)) for scheme, values in per_scheme.items()))
