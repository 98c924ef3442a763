"""QuantConfig: defaults, validation, options parsing, the cache key (fxquant/config.py)."""

import pytest

from fxquant import QuantConfig


def test_defaults_are_auto_skipping_lm_head():
    config = QuantConfig()
    assert config.scheme == "auto"
    assert config.skip == ("lm_head",)
    assert config.activation_scale_ub is None


def test_options_parse_and_normalize():
    config = QuantConfig.from_options({"scheme": "int8", "skip": ["lm_head", "*.gate"], "min_weight_numel": 4096})
    assert config == QuantConfig(scheme="int8", skip=("lm_head", "*.gate"), min_weight_numel=4096)
    assert QuantConfig(skip="lm_head").skip == ("lm_head",)
    assert QuantConfig.from_options(None) == QuantConfig()


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) schem; known options: scheme, skip, activation_scale_ub"):
        QuantConfig.from_options({"schem": "int8"})


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown scheme .fp3.; valid schemes: auto, fp8_rowwise, fp8_blockwise, fp8_tensorwise, int8, nf4, fp4, llm_int8"):
        QuantConfig(scheme="fp3")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scheme": "int8", "activation_scale_ub": 100.0}, "applies to fp8_rowwise, fp8_blockwise, fp8_tensorwise, not 'int8'"),
        ({"activation_scale_ub": 0.0}, "must be positive"),
        ({"min_weight_numel": -1}, "must be >= 0"),
        ({"skip": [3]}, "list of glob strings"),
    ],
)
def test_invalid_values_are_errors(options, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.from_options(options)


def test_cache_key_is_stable_and_covers_every_field():
    assert QuantConfig().cache_key() == QuantConfig().cache_key()
    keys = {
        QuantConfig().cache_key(),
        QuantConfig(scheme="int8").cache_key(),
        QuantConfig(skip=()).cache_key(),
        QuantConfig(activation_scale_ub=1200.0).cache_key(),
        QuantConfig(check_weight_updates=False).cache_key(),
    }
    assert len(keys) == 5


def test_scheme_options_and_rules():
    """A scheme's options come from scheme_options, else the shared field of that name; rules take part
    in the cache key and in which shared fields apply."""
    config = QuantConfig(scheme="fp8_blockwise", scheme_options={"fp8_blockwise": {"weight_block_size": [32, 32]}})
    assert config.options_for("fp8_blockwise").weight_block_size == (32, 32)
    assert QuantConfig(scheme="fp8_blockwise", weight_block_size=[64, 64]).options_for("fp8_blockwise").weight_block_size == (64, 64)
    with pytest.raises(ValueError, match="fp8_rowwise has no option.s. weight_block_size; its options: activation_scale_ub"):
        QuantConfig(scheme_options={"fp8_rowwise": {"weight_block_size": (32, 32)}})
    with pytest.raises(ValueError, match="static_activation_amax applies to fp8_tensorwise, not 'int8', 'fp8_rowwise'"):
        QuantConfig(scheme="int8", rules={"a": "fp8_rowwise"}, static_activation_amax={"a": 1.0})
    assert QuantConfig(rules={"a": "int8"}).cache_key() != QuantConfig().cache_key()
    assert QuantConfig(rules={"a": None}).decide("a") == (None, "rules", "a", None)
