"""End to end on a tiny random-init Llama (tests.models.tiny_llama: 2 layers, hidden 64).

For each scheme: logits close to fp32 eager (and not identical), the plan (14 decoder linears
rewritten, lm_head skipped), no recompile for new sequence lengths once the graph is dynamic,
grad-mode inference that matches no_grad and refuses backward, and the user's model untouched.
"""

import pytest
import torch

import fxquant
from tests.models import relative_error, tiny_llama

pytest.importorskip("transformers")

SCHEMES = ["fp8_rowwise", "int8"]
# Measured logits relative error at input (2, 16): fp8_rowwise 0.0369, int8 0.0080; over sequence
# lengths 8-24: fp8_rowwise 0.035-0.041, int8 0.009-0.011. Bounds are about 2x the worst seen.
MAX_RELATIVE_ERROR = {"fp8_rowwise": 0.08, "int8": 0.025}
DECODER_LINEARS = [
    f"model.layers.{i}.{name}"
    for i in range(2)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]
SEQUENCE_LENGTHS = [8, 12, 16, 20, 24]


def input_ids(seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, seq_len), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_plan_and_dynamic_lengths(scheme):
    model = tiny_llama()
    b = fxquant.backend(fxquant.QuantConfig(scheme=scheme))
    compiled = torch.compile(model, backend=b)
    ids = input_ids(16)
    with torch.no_grad():
        reference, actual = logits(model, ids), logits(compiled, ids)

    error = relative_error(actual, reference)
    print(f"\ntiny Llama {scheme}: logits relative error {error:.4f} at (2, 16)")
    assert 0 < error <= MAX_RELATIVE_ERROR[scheme], f"{scheme}: relative error {error:.4f} not in (0, {MAX_RELATIVE_ERROR[scheme]}]"

    assert len(b.plans) == 1, f"expected one graph for the whole model, got {len(b.plans)}:\n" + "\n".join(map(str, b.plans))
    plan = b.plans[0]
    rewritten = {entry.layer: entry.scheme for entry in plan.rewritten}
    assert rewritten == dict.fromkeys(DECODER_LINEARS, scheme), f"{scheme}: wrong layers rewritten:\n{plan}"
    skipped = {entry.layer: entry.note for entry in plan.skipped}
    assert list(skipped) == ["lm_head"], f"{scheme}: only lm_head should be skipped:\n{plan}"
    assert "skip list" in skipped["lm_head"], f"lm_head skipped for the wrong reason: {skipped['lm_head']!r}"

    # The (2, 16) call compiled the first graph; a new length may recompile once, dynamically, then never again.
    graphs_after = []
    for seq_len in SEQUENCE_LENGTHS:
        ids = input_ids(seq_len, seed=seq_len)
        with torch.no_grad():
            error = relative_error(logits(compiled, ids), logits(model, ids))
        assert 0 < error <= MAX_RELATIVE_ERROR[scheme], f"{scheme}, length {seq_len}: relative error {error:.4f}"
        graphs_after.append(len(b.plans))
    unique_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"tiny Llama {scheme}: graphs compiled after lengths {SEQUENCE_LENGTHS}: {graphs_after} (unique_graphs {unique_graphs})")
    assert graphs_after[-1] <= 2, f"{scheme}: {graphs_after[-1]} graphs compiled for lengths 16, {SEQUENCE_LENGTHS}; want at most 2"
    assert len(set(graphs_after)) == 1, f"{scheme}: new sequence lengths recompiled after the first dynamic graph: {graphs_after}"
    assert unique_graphs == graphs_after[-1], f"Dynamo compiled {unique_graphs} graphs but the backend saw {graphs_after[-1]}"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_grad_mode_inference_and_user_model_untouched(scheme):
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    compiled = torch.compile(model, backend=fxquant.backend(fxquant.QuantConfig(scheme=scheme)))
    ids = input_ids(16)
    with torch.no_grad():
        expected = logits(compiled, ids)

    actual = logits(compiled, ids)  # grad mode on, parameters require grad
    assert actual.requires_grad, "grad-mode logits should require grad (lm_head is unquantized)"
    torch.testing.assert_close(actual.detach(), expected, msg=lambda m: f"{scheme}: grad-mode output differs from no_grad: {m}")
    with pytest.raises(RuntimeError, match="inference-only"):
        actual.sum().backward()

    after = model.state_dict()
    assert after.keys() == before.keys(), f"state_dict keys changed: {sorted(after.keys() ^ before.keys())}"
    changed = [
        name for name, tensor in before.items()
        if after[name].dtype != tensor.dtype or after[name].shape != tensor.shape
        or not torch.equal(after[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8))
    ]
    assert not changed, f"{scheme}: compiling and running changed the user's tensors: {changed}"
    linears = {name: model.get_submodule(name) for name in [*DECODER_LINEARS, "lm_head"]}
    not_linear = {name: type(module).__name__ for name, module in linears.items() if type(module) is not torch.nn.Linear}
    assert not not_linear, f"{scheme}: modules no longer nn.Linear: {not_linear}"
    not_float = {name: module.weight.dtype for name, module in linears.items() if module.weight.dtype != torch.float32}
    assert not not_float, f"{scheme}: weights no longer float32: {not_float}"


def test_generate_with_a_static_cache_compiles_twice_not_per_token():
    """HF generate with cache_implementation="static": one prefill graph and one decode graph,
    reused for every token and for a second prompt (the decode shape never changes)."""
    model = tiny_llama()
    backend = fxquant.backend()
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        for seed in (1, 2):
            out = model.generate(input_ids(8, seed=seed), max_new_tokens=12, do_sample=False, cache_implementation="static")
            assert out.shape == (2, 20)
    assert len(backend.plans) == 2, f"want a prefill and a decode graph, got {len(backend.plans)}"
    assert all(len(plan.rewritten) == 14 for plan in backend.plans)
