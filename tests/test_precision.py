"""The model's FLOP estimate against a count by hand, and the MFU arithmetic of the benches
(bench/peak.py). No test here times anything."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from arc.model import HybridLM, preset
from arc.tokens import VOCAB_SIZE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peak  # noqa: E402  (bench/peak.py)


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
