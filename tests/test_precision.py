"""The precision policy (arc/loss.py: what ``--dtype auto`` means on each device), the model's FLOP
estimate against a count by hand, and the MFU arithmetic of the benches (bench/peak.py).

No test here times anything: the CPU probe's measurement is replaced by a fixed answer, so the
choice it drives is tested, not the machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from arc import loss
from arc.model import HybridLM, preset
from arc.tokens import VOCAB_SIZE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peak  # noqa: E402  (bench/peak.py)


@pytest.fixture
def fresh_verdict():
    """Forget the process's cached probe verdict before and after the test."""
    loss.cpu_bf16_verdict.cache_clear()
    yield
    loss.cpu_bf16_verdict.cache_clear()


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# ---- --dtype auto ---------------------------------------------------------------------------------
def test_auto_is_bfloat16_on_a_cpu_whose_bf16_matmul_is_faster(monkeypatch, fresh_verdict):
    monkeypatch.setattr(loss, "_has_bf16_units", lambda: True)
    monkeypatch.setattr(loss, "_measure_bf16_speedup", lambda: 2.3)
    assert loss.resolve_dtype("auto", CPU) == "bfloat16"
    verdict = loss.cpu_bf16_verdict()
    assert verdict.use_bf16 and verdict.speedup == 2.3 and "2.30x" in verdict.reason


@pytest.mark.parametrize("speedup", [0.05, 1.0, loss.BF16_MIN_SPEEDUP - 0.01])
def test_auto_is_float32_when_the_probe_finds_bf16_slower_or_not_faster_enough(monkeypatch, fresh_verdict, speedup):
    monkeypatch.setattr(loss, "_has_bf16_units", lambda: True)
    monkeypatch.setattr(loss, "_measure_bf16_speedup", lambda: speedup)
    assert loss.resolve_dtype("auto", CPU) == "float32"
    assert isinstance(loss.autocast_for("auto", CPU), type(loss.autocast_for("float32", CPU)))  # a no-op


def test_auto_is_float32_without_bf16_units_and_does_not_probe(monkeypatch, fresh_verdict):
    monkeypatch.setattr(loss, "_has_bf16_units", lambda: False)

    def must_not_run():
        raise AssertionError("probed a CPU without bf16 units")

    monkeypatch.setattr(loss, "_measure_bf16_speedup", must_not_run)
    assert loss.resolve_dtype("auto", CPU) == "float32"
    assert loss.cpu_bf16_verdict().speedup is None


def test_the_probe_runs_once_per_process(monkeypatch, fresh_verdict):
    calls = []
    monkeypatch.setattr(loss, "_has_bf16_units", lambda: True)
    monkeypatch.setattr(loss, "_measure_bf16_speedup", lambda: calls.append(1) or 2.0)
    for _ in range(3):
        loss.resolve_dtype("auto", CPU)
    assert calls == [1]


def test_cuda_auto_is_bfloat16_and_explicit_dtypes_are_kept(monkeypatch, fresh_verdict):
    monkeypatch.setattr(loss, "_measure_bf16_speedup", lambda: 0.1)
    assert loss.resolve_dtype("auto", CUDA) == "bfloat16"
    for device in (CPU, CUDA):
        assert loss.resolve_dtype("float32", device) == "float32"
        assert loss.resolve_dtype("bfloat16", device) == "bfloat16"
    with pytest.raises(ValueError, match="--dtype must be one of"):
        loss.resolve_dtype("float16", CPU)


def test_explicit_bfloat16_autocasts_matmuls_on_cpu():
    a = torch.randn(4, 8)
    with loss.autocast_for("bfloat16", CPU):
        assert (a @ a.T).dtype == torch.bfloat16
    with loss.autocast_for("float32", CPU):
        assert (a @ a.T).dtype == torch.float32


def test_the_real_probe_returns_a_verdict_it_can_explain(fresh_verdict):
    verdict = loss.cpu_bf16_verdict()  # the real machine: either answer is right, but it must say why
    assert isinstance(verdict.use_bf16, bool) and verdict.reason
    assert loss.resolve_dtype("auto", CPU) == ("bfloat16" if verdict.use_bf16 else "float32")


# ---- FLOPs per token ------------------------------------------------------------------------------
def test_flop_estimate_equals_a_count_by_hand_on_the_tiny_config():
    """tiny: d_model 32, layers M M A M, d_state 16, headdim 16 (4 heads of d_inner 64), chunk 16,
    gated MLP 64 after every mixer, tied embeddings. Training = 6 FLOPs per multiply-add."""
    m = HybridLM(preset("tiny"))
    mamba_weights = (164 * 32      # in_proj: [z 64, x 64, B 16, C 16, dt 4] x d_model
                     + 96 * 4      # depthwise conv over x, B, C (96 channels), width 4
                     + 32 * 64)    # out_proj
    mlp_weights = 128 * 32 + 32 * 64  # fc1 (a and gate), fc2
    scan = 16 * (16 + 64) + 2 * 64 * 16  # per token: C.B and scores @ x over a 16-chunk, chunk state, read-out
    attn_weights = 96 * 32 + 32 * 32  # in_proj [q, k, v], out_proj

    def by_hand(t: int) -> int:
        attention_scores = 2 * t * 32  # QK^T and AV over the full length (the PaLM/nanoGPT convention)
        return 6 * (3 * (mamba_weights + mlp_weights + scan) + attn_weights + mlp_weights + attention_scores
                    + VOCAB_SIZE * 32)  # + the output head

    for t in (1, 100, 512):
        assert m.estimate_flops_per_token(t) == by_hand(t)
    assert m.estimate_flops_per_token() == by_hand(512)  # default: max_seq_len


# ---- MFU arithmetic -------------------------------------------------------------------------------
def test_mfu_is_model_flops_over_the_peak():
    assert peak.mfu(3e6, 1000.0, 12e9) == pytest.approx(0.25)
    assert peak.mfu(3e6, 1000.0, None) is None
    p = peak.Peak(200e9, 450e9, "test")
    assert p.best == 450e9 and p.of("float32") == 200e9
    assert "450 GFLOP/s" in p.describe()


def test_peak_given_on_the_command_line_and_gpu_spec_sheet(monkeypatch):
    assert peak.measure_peak("cpu", given_tflops=2.0).bfloat16 == 2e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak.measure_peak("cuda").bfloat16 == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    unknown = peak.measure_peak("cuda")
    assert unknown.best is None and "--peak-tflops" in unknown.source
