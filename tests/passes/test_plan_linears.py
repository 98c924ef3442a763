"""The plan (passes/plan_linears.py): which layers are rewritten, and the reason for each one skipped."""

import logging

import torch
import torch.nn as nn
from expecttest import TestCase

import fxquant
from fxquant import QuantConfig
from fxquant.log import log_once
from tests.models import MLP


class Gated(nn.Module):
    """A model whose layer shapes and names exercise every skip reason."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.gate = nn.Linear(64, 64)
        self.odd = nn.Linear(64, 40)  # N = 40: not a multiple of 16
        self.narrow = nn.Linear(40, 32)  # K = 40
        self.tiny = nn.Linear(32, 16)

    def forward(self, x):
        h = self.proj(x) * torch.sigmoid(self.gate(x))
        return self.tiny(self.narrow(self.odd(h)))


class PlanTest(TestCase):
    def test_plan_table_names_each_layer_and_reason(self):
        config = QuantConfig(skip=["gate"], min_weight_numel=1024)
        plan = fxquant.plan(Gated(), torch.randn(3, 64), config=config)
        self.assertExpectedInline(str(plan), """\
layer   op      N x K    scheme  bytes                note
------  ------  -------  ------  -------------------  -----------------------------------
proj    linear  64 x 64  int8    16.0 KiB -> 4.2 KiB  auto -> int8: no FP8 GEMMs on cpu
gate    linear  64 x 64  -       16.0 KiB             skipped by skip list (gate)
odd     linear  40 x 64  -       10.0 KiB             N=40 not divisible by 16
narrow  linear  32 x 40  -       5.0 KiB              K=40 not divisible by 16
tiny    linear  16 x 32  -       2.0 KiB              512 weights < min_weight_numel=1024
weights of these layers: 49.0 KiB -> 37.2 KiB (0.76x)
1 of 5 linear layers quantized""")

    def test_glob_patterns_match_module_paths(self):
        model = nn.Sequential(MLP(vocab=64), MLP())
        plan = fxquant.plan(model, torch.randn(2, 64), config=QuantConfig(skip=["*.down", "1.*"]))
        rewritten = [entry.layer for entry in plan.rewritten]
        self.assertEqual(rewritten, ["0.up", "0.lm_head"])
        self.assertEqual(torch._dynamo.utils.counters["fxquant"]["skipped"], 4)

    def test_unsupported_dtype_is_skipped_with_reason(self):
        model = MLP().to(torch.float64)
        plan = fxquant.plan(model, torch.randn(2, 64, dtype=torch.float64))
        self.assertEqual({entry.note for entry in plan[:2]}, {"weight dtype torch.float64 unsupported"})

    def test_plan_does_not_quantize_or_modify_the_model(self):
        model = MLP()
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        fxquant.plan(model, torch.randn(2, 64))
        for name, tensor in model.state_dict().items():
            self.assertTrue(torch.equal(tensor, before[name]), name)
        self.assertEqual(torch._dynamo.utils.counters["fxquant"]["fp8_rowwise_linear"], 0)

    def test_backend_logs_the_plan(self):
        with self.assertLogs("fxquant", level=logging.INFO) as logs:
            torch.compile(MLP(), backend=fxquant.backend(scheme="int8"))(torch.randn(2, 64))
        self.assertIn("lm_head  linear  32 x 64   -       8.0 KiB              skipped by skip list (lm_head)", "\n".join(logs.output))


def test_fp8_on_a_gpu_without_fp8_falls_back_to_int8_logged(monkeypatch, caplog):
    reason = "NVIDIA A100 (sm_80) has no FP8 tensor cores (needs sm_89+)"
    monkeypatch.setattr(fxquant.schemes.common, "fp8_unsupported_reason", lambda device: reason)
    log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fxquant"):
        plan = fxquant.plan(MLP(), torch.randn(2, 64), config=QuantConfig(scheme="fp8_rowwise"))
    assert [entry.scheme for entry in plan] == ["int8", "int8", None]
    assert plan[0].note == f"fp8_rowwise -> int8: {reason}"
    assert sum("falling back from fp8_rowwise to int8" in r.message for r in caplog.records) == 1, "logged once"
