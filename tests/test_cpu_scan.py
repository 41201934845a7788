"""The C++ twin of the Mamba2 ops on a CPU (arc/cpu_scan.py, arc/csrc/ssd_cpu.cpp) against the
pure-PyTorch reference twin (arc/kernels.py), in float64 so that any difference beyond rounding is a bug:

- the scan: outputs, final state and the gradients of all six inputs (the initial state too), for
  head dims that are and are not a multiple of the kernel's four-row blocks, state sizes that are and
  are not specialised at compile time, grouped B/C, sequences shorter and longer than a backward block;
- the decoding step against the scan, and against the reference step;
- the causal conv (widths 2-4, with and without bias) and the gated RMSNorm (one and several groups);
- a whole model, float32: forward, loss gradients and greedy decoding on the C++ path equal the
  reference path's to float32 rounding;
- what happens when the extension is skipped or fails to build: the reference path, with the reason said.

If the extension cannot be built on the machine running the tests (no compiler), these tests fail:
the project's CPU speed depends on it, and the reason is in the failure.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from arc import cpu_scan, kernels
from arc.model import HybridLM, ModelConfig

TOL64 = 1e-10


def test_the_extension_builds_here():
    assert cpu_scan.available(), cpu_scan.reason()
    assert "C++" in kernels.describe()


def scan_inputs(b, l, h, p, g, n, seed=0, initial=True):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(b, l, h, p, generator=gen, **f64)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen, **f64))
    A = -torch.empty(h, **f64).uniform_(0.5, 8.0, generator=gen)
    B = torch.randn(b, l, g, n, generator=gen, **f64)
    C = torch.randn(b, l, g, n, generator=gen, **f64)
    s0 = torch.randn(b, h, p, n, generator=gen, **f64) if initial else None
    return [t.requires_grad_() if t is not None else None for t in (x, dt, A, B, C, s0)]


# (b, l, h, p, g, n): p % 4 != 0 takes the row-by-row tail; n 16/64 are specialised, 5/24 are not;
# l 1 (a decoding step), 15/16/17 around the backward's block of 16 (and the forward's switch to the
# transposed state at 16), 130 many blocks; p 64 is the transposed forward's specialised head size
SCAN_CASES = [(2, 37, 4, 8, 2, 5), (1, 130, 8, 16, 1, 16), (2, 17, 2, 6, 1, 64), (1, 16, 4, 5, 4, 24),
              (3, 15, 2, 4, 2, 16), (2, 1, 2, 8, 1, 16), (1, 40, 2, 64, 1, 64)]


@pytest.mark.parametrize("case", SCAN_CASES)
def test_the_transposed_forward_equals_its_row_layout_twin(case):
    """Sequences of 16 tokens or more run with each head's state transposed (no horizontal sums);
    the (p, n) layout throughout (forward_rows) is its twin: the same outputs and final state."""
    x, dt, A, B, C, s0 = [t.detach() if t is not None else None for t in scan_inputs(*case)]
    s0 = torch.zeros(case[0], case[2], case[3], case[5], dtype=torch.float64) if s0 is None else s0
    mod = cpu_scan.module()
    y1, st1 = mod.forward(x, dt, A, B, C, s0)
    y2, st2 = mod.forward_rows(x, dt, A, B, C, s0)
    torch.testing.assert_close(y1, y2, rtol=0, atol=TOL64)
    torch.testing.assert_close(st1, st2, rtol=0, atol=TOL64)


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_matches_the_reference_outputs_state_and_gradients(case):
    x, dt, A, B, C, s0 = scan_inputs(*case)
    y1, st1 = cpu_scan.scan(x, dt, A, B, C, s0)
    y2, st2 = kernels.ssd_chunked_ref(x, dt, A, B, C, 8, initial_state=s0)
    torch.testing.assert_close(y1, y2, rtol=0, atol=TOL64)
    torch.testing.assert_close(st1, st2, rtol=0, atol=TOL64)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y1.shape, generator=gen, dtype=torch.float64)
    ws = torch.randn(st1.shape, generator=gen, dtype=torch.float64)
    inputs = [x, dt, A, B, C, s0]
    g1 = torch.autograd.grad((y1 * wy).sum() + (st1 * ws).sum(), inputs)
    g2 = torch.autograd.grad((y2 * wy).sum() + (st2 * ws).sum(), inputs)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "state0"), g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=TOL64, msg=lambda m, name=name: f"d{name}: {m}")


def test_scan_gradients_without_the_final_state_in_the_loss():
    x, dt, A, B, C, _ = scan_inputs(2, 20, 2, 8, 1, 16, initial=False)
    y1, _ = cpu_scan.scan(x, dt, A, B, C)
    y2, _ = kernels.ssd_chunked_ref(x, dt, A, B, C, 8)
    g1 = torch.autograd.grad(y1.square().sum(), [x, dt, A, B, C])
    g2 = torch.autograd.grad(y2.square().sum(), [x, dt, A, B, C])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=TOL64)


def test_scan_passes_gradcheck():
    x, dt, A, B, C, s0 = scan_inputs(1, 19, 2, 5, 1, 3)
    assert torch.autograd.gradcheck(lambda *t: cpu_scan.scan(*t), (x, dt, A, B, C, s0))


def test_steps_continue_the_scan_and_match_the_reference_step():
    with torch.no_grad():
        x, dt, A, B, C, s0 = scan_inputs(2, 9, 4, 8, 2, 16)
        y, s_final = cpu_scan.scan(x, dt, A, B, C, s0)
        state, ref_state = s0.clone(), s0.clone()
        for t in range(9):
            out = cpu_scan.step_(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
            ref = kernels.ssd_step_ref(ref_state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
            torch.testing.assert_close(out, y[:, t], rtol=0, atol=TOL64)
            torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
        torch.testing.assert_close(state, s_final, rtol=0, atol=TOL64)


@pytest.mark.parametrize("w,bias,shape", [(4, True, (2, 9, 70)), (4, True, (1, 3, 5)), (3, False, (3, 20, 130)),
                                          (2, True, (1, 1, 8))])
def test_conv_matches_the_reference_with_gradients(w, bias, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape[-1], 1, w, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[-1], generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    y1, y2 = cpu_scan.conv(x, weight, b), kernels.causal_conv1d_ref(x, weight, b)
    torch.testing.assert_close(y1, y2, rtol=0, atol=TOL64)
    inputs = [x, weight] + ([b] if bias else [])
    wy = torch.randn(y1.shape, generator=gen, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad((y1 * wy).sum(), inputs), torch.autograd.grad((y2 * wy).sum(), inputs)):
        torch.testing.assert_close(a, c, rtol=0, atol=TOL64)


@pytest.mark.parametrize("shape,group", [((2, 7, 48), 16), ((1, 5, 24), 24), ((40, 64), 64)])
def test_gated_norm_matches_the_reference_with_gradients(shape, group):
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[-1], generator=gen, dtype=torch.float64, requires_grad=True)
    o1, o2 = cpu_scan.gated_rmsnorm(y, z, w, 1e-5, group), kernels.gated_rmsnorm_ref(y, z, w, 1e-5, group)
    torch.testing.assert_close(o1, o2, rtol=0, atol=TOL64)
    wo = torch.randn(o1.shape, generator=gen, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad((o1 * wo).sum(), [y, z, w]), torch.autograd.grad((o2 * wo).sum(), [y, z, w])):
        torch.testing.assert_close(a, c, rtol=0, atol=TOL64)


def tiny_model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig(vocab_size=16, d_model=64, n_layer=3, layer_pattern="MAM", n_head=2, d_state=16,
                                headdim=16, chunk_size=8, max_seq_len=128))


def test_model_on_the_cpp_path_equals_the_reference_path_in_float32():
    model = tiny_model()
    ids = torch.randint(0, 16, (2, 50), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad()
        logits, _ = model(ids)
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    fast_logits, fast_grads = run()
    with kernels.reference_path():
        ref_logits, ref_grads = run()
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-4, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(fast_grads[k], ref_grads[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_decoding_on_the_cpp_path_gives_the_reference_tokens():
    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 16, (n,), generator=gen) for n in (20, 7, 20)]

    def greedy():
        with torch.no_grad():
            cache, last = model.prefill(prompts, 12)
            tokens = []
            for _ in range(12):
                nxt = last.argmax(-1)
                tokens.append(nxt)
                last = model.step(nxt, cache)
        return torch.stack(tokens, 1), last

    fast_tokens, fast_last = greedy()
    with kernels.reference_path():
        ref_tokens, ref_last = greedy()
    assert torch.equal(fast_tokens, ref_tokens)
    torch.testing.assert_close(fast_last, ref_last, rtol=1e-4, atol=1e-5)


def _in_subprocess(code: str, **env: str) -> str:
    import os
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True).stdout


def test_skipping_the_extension_falls_back_to_the_reference_and_says_so():
    out = _in_subprocess("from arc import kernels, cpu_scan; import torch; "
                         "print(cpu_scan.available(), kernels.use_cpu_scan(torch.zeros(1))); print(kernels.describe())",
                         ARC_NO_CPU_EXTENSION="1")
    first, line = out.splitlines()[:2]
    assert first == "False False" and "reference" in line and "ARC_NO_CPU_EXTENSION" in line


def test_a_failed_build_falls_back_to_the_reference_and_says_why():
    code = ("import logging, torch; logging.basicConfig(level=logging.WARNING); from arc import cpu_scan, kernels\n"
            "def broken(): raise RuntimeError('no compiler here')\n"
            "cpu_scan._build = broken\n"
            "m = __import__('arc.mamba2', fromlist=['Mamba2']).Mamba2(32, d_state=8, headdim=16)\n"
            "y, _ = m(torch.randn(1, 5, 32)); print(tuple(y.shape), kernels.use_cpu_scan(y)); print(kernels.describe())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, line = proc.stdout.splitlines()[:2]
    assert first == "(1, 5, 32) False" and "no compiler here" in line
    assert "no compiler here" in proc.stderr  # logged once as a warning


def test_force_reference_bypasses_the_extension():
    with kernels.reference_path():
        assert not kernels.use_cpu_scan(torch.zeros(1))
    assert kernels.use_cpu_scan(torch.zeros(1))


@pytest.mark.parametrize("ngroups,d_state,d_conv", [(1, 16, 4), (2, 8, 3), (1, 24, 2)])
def test_fused_mixer_step_equals_the_unfused_step(ngroups, d_state, d_conv):
    """Mamba2.step on a CPU runs conv, softplus, scan, D skip and gated norm as one C++ call; in
    float64 it equals the unfused reference step, output and both states, step after step."""
    from arc.mamba2 import Mamba2
    torch.manual_seed(0)
    m = Mamba2(32, d_state=d_state, d_conv=d_conv, headdim=8, ngroups=ngroups, chunk_size=8).double().eval()
    with torch.no_grad():
        m.conv1d.bias.normal_()
        u = torch.randn(3, 9, 32, dtype=torch.float64)
        _, fused = m(u[:, :4], return_state=True)
        fused.conv, fused.ssm = fused.conv.double(), fused.ssm.double()
        ref = type(fused)(fused.conv.clone(), fused.ssm.clone())
        assert kernels.fused_step_ok(u[:, 0], fused.conv, fused.ssm)
        for t in range(4, 9):
            out = m.step(u[:, t], fused)
            with kernels.reference_path():
                expected = m.step(u[:, t], ref)
            torch.testing.assert_close(out, expected, rtol=0, atol=TOL64)
            torch.testing.assert_close(fused.conv, ref.conv, rtol=0, atol=0)
            torch.testing.assert_close(fused.ssm, ref.ssm, rtol=0, atol=TOL64)


@pytest.mark.slow
def test_torch_compile_traces_the_cpp_ops_without_a_graph_break():
    """The C++ ops are torch.library custom ops with shape-only fakes, so torch.compile takes the whole
    model as one graph (fullgraph=True fails on any break) and computes what eager computes; the
    trainer's compile_s reads the time it took."""
    from arc.compiling import compile_seconds
    model = tiny_model()
    ids = torch.randint(0, 16, (2, 24), generator=torch.Generator().manual_seed(0))
    before = compile_seconds()
    compiled = torch.compile(model, fullgraph=True)
    grads = []
    for m in (compiled, model):
        model.zero_grad()
        logits, loss = m(ids, ids)
        loss.backward()
        grads.append((logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    for k, g in grads[1][1].items():
        torch.testing.assert_close(grads[0][1][k], g, rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert compile_seconds() > before


def test_extreme_activations_stay_finite_in_float32():
    """SiLU and the norm's gate at +-100 and +-1000 (where 1 / (1 + exp(-v)) overflows in float32
    and fast-math arithmetic turned it into NaN): finite, and equal to the reference, with gradients."""
    extremes = torch.tensor([-1000.0, -100.0, -89.0, -20.0, 0.0, 20.0, 89.0, 100.0, 1000.0])
    x = extremes.repeat(2, 3, 2)[..., :16].contiguous().requires_grad_()  # (2, 3, 16)
    weight = torch.zeros(16, 1, 4)
    weight[:, 0, -1] = 1.0  # the conv passes its input through: pre = x
    y1, y2 = cpu_scan.conv(x, weight, None), kernels.causal_conv1d_ref(x, weight, None)
    torch.testing.assert_close(y1, y2)
    g1, g2 = torch.autograd.grad(y1.sum(), x), torch.autograd.grad(y2.sum(), x)
    assert torch.isfinite(g1[0]).all()
    torch.testing.assert_close(g1, g2)
    y = torch.ones(2, 3, 16, requires_grad=True)
    w = torch.ones(16)
    o1, o2 = cpu_scan.gated_rmsnorm(y, x, w, 1e-5, 8), kernels.gated_rmsnorm_ref(y, x, w, 1e-5, 8)
    assert torch.isfinite(o1).all()
    torch.testing.assert_close(o1, o2)
    d1 = torch.autograd.grad(o1.square().sum(), [y, x])
    d2 = torch.autograd.grad(o2.square().sum(), [y, x])
    assert all(torch.isfinite(d).all() for d in d1)
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-5)


def test_fused_step_with_extreme_gates_stays_finite():
    from arc.mamba2 import Mamba2
    torch.manual_seed(0)
    m = Mamba2(32, d_state=16, headdim=8).eval()
    with torch.no_grad():
        m.in_proj.weight.mul_(300.0)  # in_proj outputs (gates, conv inputs, dt) in the hundreds
        u = torch.randn(2, 6, 32)
        _, fused = m(u[:, :3], return_state=True)
        ref = type(fused)(fused.conv.clone(), fused.ssm.clone())
        for t in range(3, 6):
            out = m.step(u[:, t], fused)
            with kernels.reference_path():
                expected = m.step(u[:, t], ref)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_a_step_autograd_records_takes_the_unfused_ops_and_never_drops_gradients_silently():
    """The one-call C++ step has no backward: with gradients on, a step takes the unfused ops, whose
    in-place state update makes a backward fail loudly (as it always did), never a silent None."""
    from arc.mamba2 import Mamba2
    torch.manual_seed(0)
    m = Mamba2(32, d_state=16, headdim=8)
    state = m.allocate_state(2, "cpu")
    u = torch.randn(2, 32)
    assert not kernels.fused_step_ok(m.in_proj(u), state.conv, state.ssm)  # grad mode is on here
    with torch.no_grad():
        assert kernels.fused_step_ok(m.in_proj(u), state.conv, state.ssm)
    out = m.step(torch.randn(2, 32), state)
    with pytest.raises(RuntimeError, match="inplace"):
        out.square().sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixer_extend_and_commit_are_the_steps_bit_for_bit(dtype):
    """The speculative decoder's C++ check: T tokens by mixer_extend give exactly the outputs of T
    mixer_step_ calls (the same code), leave the states untouched, and mixer_commit_ moves each
    sequence's states past its own count of tokens (0 to T) exactly as that many steps do; counts
    outside [0, T] are refused."""
    from arc.mamba2 import Mamba2
    torch.manual_seed(0)
    m = Mamba2(32, d_state=16, headdim=8, ngroups=2).to(dtype).eval()
    b, t = 4, 5
    with torch.no_grad():
        _, start = m(torch.randn(b, 7, 32, dtype=dtype), return_state=True)
        conv, ssm = start.conv.to(dtype).contiguous(), start.ssm.to(dtype).contiguous()
        zx = m.in_proj(torch.randn(b, t, 32, dtype=dtype)).contiguous()
        weights = m.fused_weights()
        c0, s0 = conv.clone(), ssm.clone()
        out = cpu_scan.mixer_extend(zx, conv, ssm, *weights)
        assert torch.equal(conv, c0) and torch.equal(ssm, s0)
        after = []  # the states after 0..T steps
        c, s = c0.clone(), s0.clone()
        after.append((c.clone(), s.clone()))
        for k in range(t):
            assert torch.equal(out[:, k], cpu_scan.mixer_step_(zx[:, k], c, s, *weights))
            after.append((c.clone(), s.clone()))
        counts = torch.tensor([0, 1, t, 3])
        cpu_scan.mixer_commit_(zx, conv, ssm, *weights, counts)
        for i, k in enumerate(counts.tolist()):
            assert torch.equal(conv[i], after[k][0][i]) and torch.equal(ssm[i], after[k][1][i])
        kept = conv.clone(), ssm.clone()
        for bad in ([0, 1, t + 1, 0], [0, -1, 0, 0]):
            with pytest.raises(RuntimeError, match="is outside"):
                cpu_scan.mixer_commit_(zx, conv, ssm, *weights, torch.tensor(bad))
            assert torch.equal(conv, kept[0]) and torch.equal(ssm, kept[1])  # refused before any change
