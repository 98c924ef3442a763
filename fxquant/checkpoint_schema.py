"""What a checkpoint's fxquant.json must look like, checked in one place before anything reads it,
so that a malformed file is an error naming the entry ("plan[1].shape is [1, 2, 3], expected two
positive integers"), never a KeyError or TypeError from deep inside the loader.

A spec is a JSON type (str, int, float, bool, None; a tuple of them: any of those), `[spec]` (a
list of items that fit spec), `{key: spec}` (a map with those keys; a key ending in "?" may be
absent), `MapOf(spec)` (a map from names to values that fit spec) or `Where(test, description)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MapOf:
    values: object


@dataclass(frozen=True)
class Where:
    test: Callable[[object], bool]
    description: str


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits_type(value: object, kind: type | None) -> bool:
    if kind is None:
        return value is None
    if kind is int:
        return _is_int(value)
    if kind is float:
        return _is_int(value) or isinstance(value, float)
    return isinstance(value, kind)


def _type_name(kind: type | None) -> str:
    names = {None: "null", str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "a map"}
    return names[kind]


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a map"
    text = repr(value) if not isinstance(value, list) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def mismatch(value: object, spec: object, where: str) -> str | None:
    """Where `value` first departs from `spec`, as "<where> is <value>, expected <what>"; None if it fits."""
    if isinstance(spec, Where):
        return None if spec.test(value) else f"{where} is {_describe(value)}, expected {spec.description}"
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{where} is {_describe(value)}, expected a list"
        return next(filter(None, (mismatch(item, spec[0], f"{where}[{i}]") for i, item in enumerate(value))), None)
    if isinstance(spec, (dict, MapOf)):
        if not isinstance(value, dict):
            return f"{where} is {_describe(value)}, expected a map"
        prefix = f"{where}." if where else ""
        if isinstance(spec, MapOf):
            items = [(f"{prefix}{key}", item, spec.values) for key, item in value.items()]
        else:
            missing = [key for key in spec if not key.endswith("?") and key not in value]
            if missing:
                return f"{where or 'the file'} lacks {', '.join(repr(key) for key in missing)}"
            items = [(f"{prefix}{key.rstrip('?')}", value[key.rstrip("?")], item_spec)
                     for key, item_spec in spec.items() if key.rstrip("?") in value]
        return next(filter(None, (mismatch(item, item_spec, name) for name, item, item_spec in items)), None)
    kinds = spec if isinstance(spec, tuple) else (spec,)
    if any(_fits_type(value, kind) for kind in kinds):
        return None
    return f"{where} is {_describe(value)}, expected {' or '.join(_type_name(kind) for kind in kinds)}"


def _sizes(count: int | None, smallest: int) -> Where:
    def test(value: object) -> bool:
        return (isinstance(value, list) and (count is None or len(value) == count)
                and all(_is_int(size) and size >= smallest for size in value))
    size = "positive integers" if smallest else "integers >= 0"
    return Where(test, f"{count} {size}" if count else f"a list of {size}")


def _pair(first: type, second: object, description: str) -> Where:
    """A two-item list whose items are of the JSON types `first` and `second`."""
    seconds = second if isinstance(second, tuple) else (second,)
    return Where(lambda value: isinstance(value, list) and len(value) == 2 and _fits_type(value[0], first)
                 and any(_fits_type(value[1], kind) for kind in seconds), description)


SHA256 = Where(lambda value: isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) is not None,
               "the weights file's SHA-256 (64 hexadecimal digits); re-save the checkpoint to record it")
FILE_NAME = Where(lambda value: isinstance(value, str) and value.endswith(".safetensors") and "/" not in value
                  and value not in (".", ".."), "a .safetensors file name in the checkpoint directory")

# Each QuantConfig field's JSON type (absent: the default); QuantConfig checks the values.
CONFIG = {
    "scheme?": str,
    "skip?": [str],
    "activation_scale_ub?": (float, None),
    "weight_block_size?": _sizes(2, 1),
    "static_activation_amax?": (None, [Where(lambda pair: isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                                             and _fits_type(pair[1], float), "a [layer, amax] pair")]),
    "min_weight_numel?": int,
    "check_weight_updates?": bool,
    "merge_parallel_linears?": bool,
    "rules?": [_pair(str, (str, None), "a [glob, scheme or null] pair")],
    "scheme_options?": [_pair(str, list, "a [scheme, [[option, value], ...]] pair")],
}

BYTES = {"before": int, "after": int}
# An expert weight stored one tensor per expert: E, and each part's module name with "{e}" for the expert.
EXPERTS = Where(lambda value: _is_int(value) and value >= 1, "a positive number of experts")
EXPERT_NAME = Where(lambda value: isinstance(value, str) and value.count("{e}") == 1 and "{" not in value.replace("{e}", ""),
                    'a module name with "{e}" for the expert')

METADATA = {  # format 2
    "format_version": int,
    "config": CONFIG,
    "plan": [{"layer": str, "shape": _sizes(2, 1), "scheme": (str, None), "note": str, "bytes?": BYTES,
              "experts?": EXPERTS, "expert_names?": [EXPERT_NAME]}],
    "tensors": MapOf({"dtype": str, "shape": _sizes(None, 0), "file": FILE_NAME}),
    "tied": MapOf(str),
    "bytes": BYTES,
    "sha256": Where(lambda value: isinstance(value, dict) and all(
        FILE_NAME.test(name) and SHA256.test(digest) for name, digest in value.items()),
        "a map from each weights file to its SHA-256 (64 hexadecimal digits); re-save the checkpoint to record it"),
    "files": [str],
    "quantization_config?": MapOf((str, int, float, bool, None, list, dict)),
}

METADATA_V1 = {  # one model.safetensors; still read
    "format_version": int,
    "config": CONFIG,
    "plan": [{"layer": str, "shape": _sizes(2, 1), "scheme": (str, None), "note": str}],
    "tensors": MapOf({"dtype": str, "shape": _sizes(None, 0)}),
    "tied": MapOf(str),
    "bytes": BYTES,
    "sha256": SHA256,
    "files?": [str],
    "quantization_config?": MapOf((str, int, float, bool, None, list, dict)),
}
