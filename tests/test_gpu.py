"""The fused-kernel path against the pure-PyTorch reference, on a GPU (skipped without CUDA and the
``mamba_ssm`` kernels). Run with ``pytest -m gpu tests/test_gpu.py``.

Tolerances: the Triton SSD kernels accumulate in float32 but may use TF32 tensor-core products, so
kernel and reference agree to about 1e-3 of the output's scale; the tests allow 1e-2 of it
(``max |a - b| <= 1e-2 * max |b|``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arc import kernels
from arc.mamba2 import Mamba2
from arc.model import HybridLM, preset
from arc.tokens import VOCAB_SIZE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not kernels.KERNELS.available, reason=f"mamba_ssm kernels unavailable: {kernels.KERNELS.reason}"),
]
REL = 1e-2
DEV = "cuda"


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = REL) -> None:
    a, b = a.float(), b.float()
    scale = b.abs().max().clamp(min=1e-6)
    err = (a - b).abs().max()
    assert err <= rel * scale, f"{what}: max |diff| {err.item():.3g} > {rel} * {scale.item():.3g}"


def scan_inputs(b=2, l=300, h=8, p=64, g=1, n=64, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(b, l, h, p, device=DEV, generator=gen)
    dt = torch.randn(b, l, h, device=DEV, generator=gen) - 2.0
    A = -torch.empty(h, device=DEV).uniform_(1.0, 16.0, generator=gen)
    B = torch.randn(b, l, g, n, device=DEV, generator=gen)
    C = torch.randn(b, l, g, n, device=DEV, generator=gen)
    D = torch.randn(h, device=DEV, generator=gen)
    dt_bias = torch.randn(h, device=DEV, generator=gen) - 3.0
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]


@pytest.mark.parametrize("chunk, groups", [(64, 1), (256, 2)])
def test_kernel_ssd_matches_reference_outputs_state_and_gradients(chunk, groups):
    inputs = scan_inputs(g=groups)
    assert kernels.use_kernels(inputs[0])
    y_k, s_k = kernels.ssd(*inputs, chunk, return_state=True)
    with kernels.reference_path():
        y_r, s_r = kernels.ssd(*inputs, chunk, return_state=True)
    assert_close_rel(y_k, y_r, "y")
    assert_close_rel(s_k, s_r, "final state")
    w = torch.randn_like(y_r)
    g_k = torch.autograd.grad((y_k * w).sum(), inputs)
    g_r = torch.autograd.grad((y_r * w).sum(), inputs)
    for name, a, b in zip("x dt A B C D dt_bias".split(), g_k, g_r):
        assert_close_rel(a, b, f"grad {name}")


def test_kernel_conv_matches_reference_outputs_and_gradients():
    x = torch.randn(2, 100, 192, device=DEV, requires_grad=True)
    weight = torch.randn(192, 1, 4, device=DEV, requires_grad=True)
    bias = torch.randn(192, device=DEV, requires_grad=True)
    out_k = kernels.causal_conv1d(x, weight, bias)
    out_r = kernels.causal_conv1d_ref(x, weight, bias)
    assert_close_rel(out_k, out_r, "conv")
    w = torch.randn_like(out_r)
    for name, a, b in zip(("x", "weight", "bias"), torch.autograd.grad((out_k * w).sum(), (x, weight, bias)),
                          torch.autograd.grad((out_r * w).sum(), (x, weight, bias))):
        assert_close_rel(a, b, f"conv grad {name}")


def test_mamba2_layer_kernel_path_matches_reference_on_the_same_weights():
    torch.manual_seed(0)
    m = Mamba2(256, d_state=64, headdim=64, chunk_size=64).to(DEV)
    u = torch.randn(2, 333, 256, device=DEV)
    y_k, _ = m(u)
    grads_k = torch.autograd.grad(y_k.square().mean(), list(m.parameters()))
    with kernels.reference_path():
        y_r, _ = m(u)
        grads_r = torch.autograd.grad(y_r.square().mean(), list(m.parameters()))
    assert_close_rel(y_k, y_r, "layer output")
    for (name, _), a, b in zip(m.named_parameters(), grads_k, grads_r):
        assert_close_rel(a, b, f"grad {name}")


def test_kernel_step_matches_reference_step():
    torch.manual_seed(0)
    m = Mamba2(256, d_state=64, headdim=64, chunk_size=64).to(DEV).eval()
    u = torch.randn(3, 50, 256, device=DEV)
    with torch.no_grad():
        _, state_k = m(u[:, :40], return_state=True)
        with kernels.reference_path():
            _, state_r = m(u[:, :40], return_state=True)
        assert_close_rel(state_k.ssm, state_r.ssm, "prefill ssm state")
        for t in range(40, 50):
            out_k = m.step(u[:, t], state_k)
            with kernels.reference_path():
                out_r = m.step(u[:, t], state_r)
            assert_close_rel(out_k, out_r, f"step {t}")
        assert_close_rel(state_k.conv, state_r.conv, "conv state")


def test_real_mamba_ssm_state_dict_loads_into_ours_and_computes_the_same():
    try:
        from mamba_ssm.modules.mamba2 import Mamba2 as RealMamba2
    except ImportError as e:  # einops / huggingface_hub are mamba_ssm's module-level imports
        pytest.skip(f"mamba_ssm.modules.mamba2 does not import: {e}")
    torch.manual_seed(0)
    kw = dict(d_model=256, d_state=64, headdim=64, expand=2, d_conv=4, ngroups=1, chunk_size=64)
    real = RealMamba2(**kw).to(DEV)
    ours = Mamba2(**kw).to(DEV)
    ours.load_state_dict(real.state_dict(), strict=True)
    real.load_state_dict(ours.state_dict(), strict=True)  # and back
    u = torch.randn(2, 200, 256, device=DEV)
    with torch.no_grad():
        assert_close_rel(ours(u)[0], real(u), "ours vs mamba_ssm")
        with kernels.reference_path():
            assert_close_rel(ours(u)[0], real(u), "our reference vs mamba_ssm")


def test_hybrid_bf16_step_is_close_to_float32_and_decoding_matches_forward():
    """bf16 autocast (the kernels' bf16 inputs) against float32 on the same weights and batch.
    Tolerances are the CPU test's (tests/test_model.py) loosened 2-5x for the kernels' TF32 products;
    not yet run on a GPU: no GPU was lent to the session that wrote them."""
    torch.manual_seed(0)
    m = HybridLM(preset("tiny", chunk_size=64)).to(DEV)
    idx = torch.randint(0, VOCAB_SIZE, (4, 300), device=DEV)
    results = []
    for bf16 in (False, True):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits, loss = m(idx, idx)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    (loss32, grads32), (loss16, grads16) = results
    assert loss16 == pytest.approx(loss32, rel=5e-3)
    flat32, flat16 = torch.cat([g.flatten() for g in grads32]), torch.cat([g.flatten() for g in grads16])
    assert (flat16 - flat32).norm() <= 0.05 * flat32.norm()
    for (name, _), a, b in zip(m.named_parameters(), grads16, grads32):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0.98, name
    m.eval()
    with torch.no_grad():
        full = m(idx[:2, :60])[0].float()  # (2, 60, V)
        cache, logits = m.prefill([idx[0, :50], idx[1, :41]], 10)
        assert_close_rel(logits[0], full[0, 49], "prefill 0")
        assert_close_rel(logits[1], full[1, 40], "prefill 1")
        for t in range(5):
            logits = m.step(torch.stack([idx[0, 50 + t], idx[1, 41 + t]]), cache)
            assert_close_rel(logits[0], full[0, 50 + t], f"step {t} seq 0")
            assert_close_rel(logits[1], full[1, 41 + t], f"step {t} seq 1")


def test_hybrid_on_the_kernels_matches_the_hybrid_on_the_reference_path():
    """The whole model, both ways, on the same weights: full forward (logits and gradients), then
    prefill and decoding steps; float32, so the only differences are the kernels' own (REL)."""
    torch.manual_seed(0)
    m = HybridLM(preset("tiny", chunk_size=64)).to(DEV)
    idx = torch.randint(0, VOCAB_SIZE, (2, 200), device=DEV)

    def run() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        m.train()
        m.zero_grad(set_to_none=True)
        logits, loss = m(idx, idx)
        loss.backward()
        m.eval()
        with torch.no_grad():
            cache, step_logits = m.prefill([idx[0, :150], idx[1, :97]], 8)
            steps = [step_logits]
            for t in range(8):
                steps.append(m.step(torch.stack([idx[0, 150 + t], idx[1, 97 + t]]), cache))
        return logits.detach(), [p.grad.clone() for p in m.parameters()], steps

    assert kernels.use_kernels(idx.float())
    logits_k, grads_k, steps_k = run()
    with kernels.reference_path():
        assert not kernels.use_kernels(idx.float())
        logits_r, grads_r, steps_r = run()
    assert_close_rel(logits_k, logits_r, "logits")
    for (name, _), a, b in zip(m.named_parameters(), grads_k, grads_r):
        assert_close_rel(a, b, f"grad {name}")
    for t, (a, b) in enumerate(zip(steps_k, steps_r)):
        assert_close_rel(a, b, "prefill" if t == 0 else f"step {t}")
