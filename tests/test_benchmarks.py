"""The GPU benchmarks' own code, on the CPU: device time is scarce, so a script that breaks should
break here first. e2e_llama.py runs its `--tiny` model (forward table and decode loop), weight_check.py
a narrow one, profile_decode.py's kernel categories are checked on kernel names an H100 profile
recorded, and kernel_count.py's Triton code for the CPU pins how many kernels a decode forward launches."""

import importlib
import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark(name: str):
    """A script of benchmarks/ as a module (the scripts import each other by their plain names)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_e2e(tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "e2e.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "e2e_llama.py"), "--tiny", "--modes", "default",
                           "--json", str(out), *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_e2e_forward_table_on_the_tiny_model(tmp_path):
    peers = ["bf16", "fxquant", "fxquant:split_reductions=True"]  # the last with an Inductor setting of its own
    results = run_e2e(tmp_path, "--peers", *peers, "--shapes", "1x1", "1x32", "--repeats", "2")
    assert [r["peer"] for r in results] == peers
    for result in results:
        assert list(result["shapes"]) == ["1x1", "1x32"], "--shapes picks the shapes timed"
        assert all(shape["ms"] > 0 and shape["ms_back_to_back"] > 0 and shape["first_call_s"] > 0
                   for shape in result["shapes"].values())
        assert result["recompiles_over_8_lengths"] == 0


def test_a_peers_inductor_settings_take_literals_and_fxquants_choices():
    peer_model = benchmark("e2e_llama").peer_model
    from fxquant.inductor.choices import WholeRowReductions

    _, backend = peer_model("fxquant:inductor_choices_class=WholeRowReductions,split_reductions=True", None)
    assert backend.inductor == {"inductor_choices_class": WholeRowReductions, "split_reductions": True}
    with pytest.raises(ValueError, match="NoSuchChoices"):
        peer_model("fxquant:inductor_choices_class=NoSuchChoices", None)


@pytest.mark.slow
def test_e2e_decode_loop_on_the_tiny_model(tmp_path):
    (result,) = run_e2e(tmp_path, "--decode", "--peers", "fxquant", "--decode-repeats", "1")
    assert list(result["decode"]) == ["batch 1", "batch 2"]
    for batch in result["decode"].values():
        assert batch["ms_per_step"] > 0 and batch["recompiles"] == 0


def test_profile_categories_on_an_h100_profile():
    by_category = benchmark("profile_decode").by_category
    profile = json.loads((BENCHMARKS / "results" / "profile_decode_h100_2026-11-23.json").read_text())
    bf16, fxquant = by_category(profile["bf16 1x1"]["kernels"]), by_category(profile["fxquant 1x1"]["kernels"])
    # RESULTS.md, third session: decoder GEMMs 1384 (bf16) and 978 µs (fxquant), lm_head 374 µs on both
    assert round(fxquant["FP8 GEMM"]) == 978 and round(bf16["lm_head GEMM"]) == round(fxquant["lm_head GEMM"]) == 374
    assert 1380 < bf16["GEMM"] < 1390, "bf16's decoder GEMMs, the one-call rotary sgemm among them"
    assert "FP8 GEMM" not in bf16 and round(bf16["attention"]) == round(fxquant["attention"]) == 53
    assert fxquant["Inductor kernels fusing fxquant ops"] > 0 and "Inductor kernels fusing fxquant ops" not in bf16


@pytest.mark.slow
def test_weight_check_cost_on_a_narrow_model(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "weight_check.py"), "--device", "cpu", "--layers", "1",
                           "--hidden", "128", "--repeats", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "weight_check.json").read_text())["results"]
    assert [(r["mode"], r["check_weight_updates"]) for r in results] == [("default", False), ("default", True)]
    assert all(r["weights_watched"] == 7 and list(r["shapes"]) == ["1x1", "16x1"] for r in results), "q k v o gate up down"
    assert results[0]["check_alone_us"] is None and results[1]["check_alone_us"] > 0


@pytest.mark.slow
def test_streaming_quantize_benchmark_on_a_small_config(tmp_path):
    """The >RAM benchmark's script end to end on a config small enough for a test: it writes the input,
    quantizes it with `fxquant quantize`, prints its RESULTS line and removes both directories."""
    directory = tmp_path / "streaming"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "streaming_quantize.py"), "--dir", str(directory), "--hidden", "256",
         "--intermediate", "512", "--layers", "2", "--vocab", "1024", "--in-shard-size", "1MB", "--out-shard-size", "1MB"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LlamaForCausalLM, fp8_rowwise, 14 of 15 linear layers quantized" in done.stdout
    assert "| fxquant quantize, Llama 2 layers hidden 256" in done.stdout and "peak RSS" in done.stdout
    assert not directory.exists()


@pytest.mark.slow
def test_moe_benchmark_on_tiny_configs(tmp_path):
    """benchmarks/moe.py --tiny: the kernel table (fxquant's compiled expert op, alone and behind its
    producer; the CUDA kernels are GPU-only) and a tiny Qwen3-MoE with bf16 and fxquant, per experts implementation."""
    out = tmp_path / "moe.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "moe.py"), "--tiny", "--parts", "kernels", "configs", "qwen3", "--profile",
                           "--qwen3-layers", "1", "--shapes", "1x1", "1x16", "--decode-implementations", "grouped_mm", "batched_mm",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(row["gemm"], row["tokens"]) for row in report["kernels"]][:2] == [("qwen3.gate_up", 4), ("qwen3.gate_up", 16)]
    assert report["configs"] == [] and "timed on a GPU only" in done.stdout
    assert all(row["fused_kernels"] and row["fused_kernels"][0]["us"] > 0 for row in report["kernels"])
    assert all(row["unfused"] > 0 and "fused" in row and row["rows"] == row["tokens"] * 2 for row in report["kernels"])
    runs = [(r["experts_implementation"], r["mode"], r["peer"], list(r["shapes"])) for r in report["qwen3"]]
    assert runs == [("grouped_mm", "default", "bf16", ["1x1"]), ("grouped_mm", "default", "fxquant", ["1x1"]),
                    ("batched_mm", "default", "bf16", ["1x1"]), ("batched_mm", "default", "fxquant", ["1x1"]),
                    ("grouped_mm", "default", "bf16", ["1x16"]), ("grouped_mm", "default", "fxquant", ["1x16"])]
    assert all(shape["ms"] > 0 for r in report["qwen3"] for shape in r["shapes"].values())
def test_tensor_parallel_benchmark_on_two_cpu_processes(tmp_path):
    out = tmp_path / "tp.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "tensor_parallel.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ranks"] == 2 and [r["peer"] for r in report["results"]] == ["bf16", "fxquant"]
    assert all(set(r["shapes"]) == {"1x1", "2x16"} and all(v["ms"] > 0 for v in r["shapes"].values())
               for r in report["results"])
    assert "back to back:" in done.stdout


def test_the_bitsandbytes_peer_is_load_in_4bit_and_agrees_with_fxquants_nf4():
    """e2e_llama.py's bnb-nf4 peer: bitsandbytes' Linear4bit in every linear layer but lm_head, leaving
    the model it copies alone. Its NF4 bytes are fxquant's (tests/ops/test_blockwise_4bit.py), so the
    two quantized models differ only in how they multiply: within 1e-3 of the logits' scale on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    import fxquant
    import torch
    from transformers import LlamaForCausalLM

    e2e = benchmark("e2e_llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(e2e.llama3_8b(2, tiny=True)).eval()
    quantized, backend = e2e.peer_model("bnb-nf4", model)
    kinds = {name: type(m) for name, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.pop("lm_head") is torch.nn.Linear and set(kinds.values()) == {bnb.nn.Linear4bit} and len(kinds) == 14
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    tokens = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        theirs = quantized(tokens).logits
        ours = torch.compile(model, backend=fxquant.backend(scheme="nf4"))(tokens).logits
        float_logits = model(tokens).logits
    assert backend == "inductor"
    assert (theirs - ours).abs().max() < 1e-3 * ours.abs().max()
    assert (theirs - float_logits).abs().max() > 10 * (theirs - ours).abs().max()  # quantized, not float


def test_the_slimmed_bitsandbytes_wheel_keeps_the_cpu_and_cuda_13_libraries(tmp_path):
    import zipfile

    slim = benchmark("bnb_wheel_for_device").slim
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so"]
    record = "".join(f"{name},sha256=x,1\n" for name in names) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, b"x")
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    (tmp_path / "out").mkdir()
    with zipfile.ZipFile(slim(wheel, tmp_path / "out")) as archive:
        kept = archive.namelist()
        assert kept == [*names[:2], names[3], "bitsandbytes-0.50.2.dist-info/RECORD"]
        assert "cuda118" not in archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    with pytest.raises(ValueError, match="would write over the input"):
        slim(wheel, tmp_path)


@pytest.mark.parametrize(("model", "batch"), [("qwen3", 1), ("qwen3", 16), ("llama", 1)])
def test_a_decode_forward_launches_bf16s_kernels_and_one_quantization_more(model, batch):
    """The Triton kernels Inductor writes for one decoder layer at decode (kernel_count.py, Triton code
    for the CPU): fxquant's are bf16's plus the attention output's quantization (the only producer it
    cannot fuse into, an extern attention kernel); every other activation is quantized in the kernel
    that makes it, and the rotation after Qwen3's q_norm / k_norm fuses into the attention-input copy
    as in bf16 (fxquant/inductor/settings.py's decode-shaped realize_opcount_threshold; at (16, 1)
    Qwen3's graph is decode-shaped although its experts see 64 rows)."""
    kernel_count = benchmark("kernel_count")
    tiny = kernel_count.tiny_model(model)
    counts = {peer: len(kernel_count.launches(kernel_count.wrapper_source(tiny, peer, batch, 1))[0]) for peer in ("bf16", "fxquant")}
    assert counts["fxquant"] == counts["bf16"] + 1, counts


@pytest.mark.parametrize("batch", [1, 16])
def test_an_nf4_decode_forward_launches_bf16s_kernels(batch):
    """nf4 at decode (1 and 16 rows, kernel_count.py): each layer is one extern call of the fused 4-bit
    kernels (fxquant::linear_4bit_partials) and the sum of its split-K partials fuses into the kernel
    that reads the output, so the Triton kernels are bf16's (nothing to quantize: weight-only)."""
    kernel_count = benchmark("kernel_count")
    tiny = kernel_count.tiny_model("llama")
    launched = {peer: kernel_count.launches(kernel_count.wrapper_source(tiny, peer, batch, 1)) for peer in ("bf16", "fxquant-nf4")}
    assert len(launched["fxquant-nf4"][0]) == len(launched["bf16"][0]), launched
    assert launched["fxquant-nf4"][1].count("fxquant.linear_4bit_partials.default") == 7  # q, k, v, o, gate, up, down


def emulate_ptx(asm: str, registers: dict[str, int]) -> dict[str, int]:
    """Run the 32-bit mov / and / or / shr / prmt (default mode) of an inline-assembly string."""
    registers = dict(registers)
    for instruction in filter(None, (part.strip() for part in asm.strip().removeprefix("{").removesuffix("}").split(";"))):
        if instruction.startswith(".reg"):
            continue
        opcode, operands = instruction.split(None, 1)
        out, *sources = [operand.strip() for operand in operands.split(",")]
        v = [registers[s] if s in registers else int(s, 0) for s in sources]
        if opcode == "prmt.b32":
            pool, selectors = (v[1] << 32) | v[0], v[2]
            assert all((selectors >> 4 * i) & 0x8 == 0 for i in range(4)), "sign-replicating selectors are not emulated"
            registers[out] = sum(((pool >> 8 * ((selectors >> 4 * i) & 0x7)) & 0xFF) << 8 * i for i in range(4))
        else:
            registers[out] = {"mov.b32": lambda: v[0], "and.b32": lambda: v[0] & v[1], "or.b32": lambda: v[0] | v[1],
                              "shr.b32": lambda: v[0] >> v[1]}[opcode]()
    return registers


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_4bit_probes_prmt_lookup_gives_each_codes_bf16_value(quant_type):
    """benchmarks/probe_4bit_lut.py's PTX, emulated: 4 packed bytes (8 codes, the even one in each high
    nibble) become the even codes' bf16 values in $0 $1 and the odd ones' in $2 $3, in order."""
    import random

    import torch

    from fxquant.ops.blockwise_4bit import code_table

    values = code_table(quant_type)
    asm = benchmark("probe_4bit_lut").prmt_asm(values)
    bits = (values.to(torch.bfloat16).view(torch.int16).int() & 0xFFFF).tolist()
    generator = random.Random(0)
    for word in [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF, *(generator.getrandbits(32) for _ in range(2000))]:
        out = emulate_ptx(asm.replace("$4", "w").replace("$", "r"), {"w": word})  # the input, the outputs r0-r3
        halves = [half for reg in ("r0", "r1", "r2", "r3") for half in (out[reg] & 0xFFFF, out[reg] >> 16)]
        packed = [(word >> 8 * j) & 0xFF for j in range(4)]
        assert halves == [bits[byte >> 4] for byte in packed] + [bits[byte & 0xF] for byte in packed], hex(word)
