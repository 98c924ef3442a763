"""Calibration and static fp8_tensorwise scales (fxquant/calibrate.py, fxquant/config.py).

Checks that `fxquant.calibrate` records, under the plan's layer names, each layer's true max
|input| over all batches and nothing for skipped layers; that a Calibration survives save/load;
that a model compiled with the calibrated static scales stays close to eager; and the errors:
a layer without a calibrated amax is skipped, a weight changed after its scale was folded, a
calibration config that already has static scales, invalid static_activation_amax and
weight_block_size values, a NaN or Inf activation in any batch, and calibration files that are
not strict JSON or hold an amax static scales cannot use.
"""

import json
import re

import pytest
import torch

import fxquant
from fxquant import Calibration, QuantConfig
from tests.models import MLP, MatmulOnWeight, relative_error

STATIC_BOUND = 0.08  # the relative error bound test_backend.py uses for fp8_rowwise; ~0.05 measured


def mlp_batches() -> list[tuple[torch.Tensor]]:
    """Three batches of different shapes; the largest |input| of each layer comes from different ones."""
    torch.manual_seed(1)
    return [(torch.randn(2, 8, 64),), (torch.randn(3, 5, 64),), (torch.randn(1, 11, 64),)]


def true_input_amax(model: torch.nn.Module, batches, layers: list[str]) -> dict[str, float]:
    """max |input| of each named submodule over all batches, through forward pre-hooks on eager runs."""
    amax = dict.fromkeys(layers, 0.0)

    def record(name):
        def hook(module, args):
            amax[name] = max(amax[name], float(args[0].abs().amax()))

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in layers]
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    for handle in handles:
        handle.remove()
    return amax


def test_mlp_amax_is_each_layers_true_max_input_under_the_plans_names():
    torch.manual_seed(0)
    model, batches = MLP(), mlp_batches()
    calibration = fxquant.calibrate(model, batches)

    plan = fxquant.plan(model, *batches[0], config=QuantConfig(scheme="fp8_tensorwise"))
    planned = [entry.layer for entry in plan.rewritten]
    assert sorted(calibration.amax) == sorted(planned) == ["down", "up"], (
        f"calibrated layers {sorted(calibration.amax)}, planned {sorted(planned)}"
    )
    assert "lm_head" in [entry.layer for entry in plan.skipped], "lm_head is skipped by default, so not observed"
    assert calibration.amax == true_input_amax(model, batches, planned), "amax differs from the inputs' true max |x|"
    assert calibration.batches == len(batches)


def test_skip_list_of_the_calibration_config_chooses_the_observed_layers():
    torch.manual_seed(0)
    model, batches = MLP(), mlp_batches()
    calibration = fxquant.calibrate(model, batches, QuantConfig(scheme="fp8_tensorwise", skip=("down",)))
    assert calibration.amax == true_input_amax(model, batches, ["up", "lm_head"])


def test_matmul_on_bare_parameters_is_observed_under_the_parameter_names():
    torch.manual_seed(0)
    model = MatmulOnWeight()
    inputs = [torch.randn(4, 64), 2.0 * torch.randn(6, 64)]
    calibration = fxquant.calibrate(model, [{"x": x} for x in inputs])  # dict batches are passed as kwargs

    plan = fxquant.plan(model, inputs[0], config=QuantConfig(scheme="fp8_tensorwise"))
    assert sorted(calibration.amax) == sorted(entry.layer for entry in plan.rewritten) == ["v", "w"]
    with torch.no_grad():
        expected = {
            "w": max(float(x.abs().amax()) for x in inputs),  # x @ w.t()
            "v": max(float(torch.tanh(x @ model.w.t()).abs().amax()) for x in inputs),  # tanh(...) @ v
        }
    assert calibration.amax == expected, f"amax {calibration.amax}, want {expected}"


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    calibration = fxquant.calibrate(MLP(), mlp_batches())
    path = tmp_path / "amax.json"
    calibration.save(path)
    assert Calibration.load(path) == calibration


def test_static_scales_compile_close_to_eager():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16, 64)
    calibration = fxquant.calibrate(model, mlp_batches())
    backend = fxquant.backend(QuantConfig(scheme="fp8_tensorwise", static_activation_amax=calibration.amax), keep_graphs=True)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        error = relative_error(compiled(x), model(x))
    assert 0 < error < STATIC_BOUND, f"static fp8_tensorwise: relative error {error:.4f}"
    code = backend.graphs[0].code
    assert code.count("fxquant.fp8_tensorwise_static_linear") == 2, f"want the static op for up and down:\n{code}"


def test_layer_without_calibrated_amax_is_skipped():
    torch.manual_seed(0)
    model, batches = MLP(), mlp_batches()
    amax = fxquant.calibrate(model, batches).amax
    config = QuantConfig(scheme="fp8_tensorwise", static_activation_amax={"up": amax["up"]})
    entries = {entry.layer: entry for entry in fxquant.plan(model, *batches[0], config=config)}
    assert entries["up"].scheme == "fp8_tensorwise"
    assert entries["down"].scheme is None and entries["down"].note == "no calibrated activation amax", (
        f"down: scheme {entries['down'].scheme}, note {entries['down'].note!r}"
    )


def test_weight_changed_after_folding_its_scale_is_an_error_until_recompiled():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    config = QuantConfig(scheme="fp8_tensorwise", static_activation_amax=fxquant.calibrate(model, mlp_batches()).amax)
    compiled = torch.compile(model, backend=fxquant.backend(config))
    with torch.no_grad():
        compiled(x)
        model.down.weight.mul_(0.5)  # down's input, and so its calibrated amax, is unchanged
        with pytest.raises(RuntimeError, match="folded"):
            compiled(x)
        torch._dynamo.reset()  # what the error message says to do
        error = relative_error(compiled(x), model(x))
    assert error < STATIC_BOUND, f"after recompiling, relative error {error:.4f}: the new weight was not quantized"


def test_calibrate_rejects_a_config_with_static_scales():
    config = QuantConfig(scheme="fp8_tensorwise", static_activation_amax={"up": 1.0})
    with pytest.raises(ValueError, match="without static_activation_amax"):
        fxquant.calibrate(MLP(), mlp_batches(), config)


def test_static_activation_amax_is_normalized():
    config = QuantConfig(scheme="fp8_tensorwise", static_activation_amax={"b": 2, "a": 1.5})
    assert config.static_activation_amax == (("a", 1.5), ("b", 2.0)), "a dict becomes sorted (layer, float) pairs"
    assert config == QuantConfig(scheme="fp8_tensorwise", static_activation_amax=[("a", 1.5), ("b", 2.0)])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scheme": "fp8_rowwise", "static_activation_amax": {"up": 1.0}}, "applies to fp8_tensorwise, not 'fp8_rowwise'"),
        ({"scheme": "int8", "static_activation_amax": {"up": 1.0}}, "applies to fp8_tensorwise, not 'int8'"),
        ({"scheme": "fp8_tensorwise", "static_activation_amax": {"up": 0.0}}, "must be positive and finite"),
        ({"scheme": "fp8_tensorwise", "static_activation_amax": {"up": -1.0}}, "must be positive and finite"),
        ({"scheme": "fp8_tensorwise", "static_activation_amax": {"up": float("inf")}}, "must be positive and finite"),
        ({"scheme": "fp8_tensorwise", "static_activation_amax": {"up": float("nan")}}, "must be positive and finite"),
        ({"scheme": "fp8_blockwise", "weight_block_size": (100, 128)}, "two positive multiples of 16"),
        ({"scheme": "fp8_blockwise", "weight_block_size": (128, 8)}, "two positive multiples of 16"),
        ({"scheme": "fp8_blockwise", "weight_block_size": (128, 0)}, "two positive multiples of 16"),
        ({"scheme": "fp8_blockwise", "weight_block_size": (128,)}, "two positive multiples of 16"),
    ],
)
def test_invalid_static_amax_and_block_size_are_errors(options, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.from_options(options)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("bad_batch", [0, 1, 2])
def test_a_non_finite_input_in_any_batch_is_an_error_naming_the_layer_and_batch(bad_batch, value):
    torch.manual_seed(0)
    batches = mlp_batches()
    batches[bad_batch][0][0, 1, 2] = value
    with pytest.raises(ValueError, match=rf"^fxquant: calibration batch {bad_batch}: the input of layer 'up' holds a NaN or Inf"):
        fxquant.calibrate(MLP(), batches)


def test_a_non_finite_activation_inside_the_model_names_the_layer_it_reaches():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.up.bias[3] = float("inf")  # up's input is finite, down's (gelu(inf) = inf) is not
    with pytest.raises(ValueError, match="batch 0: the input of layer 'down' holds a NaN or Inf"):
        fxquant.calibrate(model, mlp_batches())


def test_save_writes_strict_json(tmp_path):
    torch.manual_seed(0)
    calibration = fxquant.calibrate(MLP(), mlp_batches())
    path = tmp_path / "amax.json"
    calibration.save(path)

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data == {"amax": calibration.amax, "batches": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["amax.json"], "no temporary file is left"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_save_refuses_an_amax_that_static_scales_cannot_use_and_keeps_the_old_file(tmp_path, value):
    path = tmp_path / "amax.json"
    Calibration(amax={"up": 1.0}, batches=1).save(path)
    before = path.read_text()
    with pytest.raises(ValueError, match=r"^fxquant: Calibration.save: layer 'down': amax .* is not a positive finite number"):
        Calibration(amax={"up": 1.0, "down": value}, batches=1).save(path)
    assert path.read_text() == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text.replace("1.5", "NaN"), "layer 'down': amax nan is not a positive finite number"),
        (lambda text: text.replace("1.5", "Infinity"), "layer 'down': amax inf is not a positive finite number"),
        (lambda text: text.replace("1.5", "-Infinity"), "layer 'down': amax -inf is not a positive finite number"),
        (lambda text: text.replace("1.5", "0"), "layer 'down': amax 0 is not a positive finite number"),
        (lambda text: text.replace("1.5", "-2.0"), "layer 'down': amax -2.0 is not a positive finite number"),
        (lambda text: text.replace("1.5", '"1.5"'), "layer 'down': amax '1.5' is not a positive finite number"),
        (lambda text: text.replace("1.5", "true"), "layer 'down': amax True is not a positive finite number"),
        (lambda text: text.replace('"batches"', '"batch"'), "not a calibration file"),
        (lambda text: "[" + text + "]", "not a calibration file"),
        (lambda text: text[: len(text) // 2], "not JSON"),
    ],
)
def test_load_refuses_a_malformed_file_naming_it_and_the_layer(tmp_path, edit, message):
    path = tmp_path / "amax.json"
    Calibration(amax={"down": 1.5, "up": 2.25}, batches=2).save(path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=f"^fxquant: {re.escape(str(path))}: {re.escape(message)}"):
        Calibration.load(path)
