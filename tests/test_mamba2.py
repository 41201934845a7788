"""The Mamba2 mixer and its compute ops (arc/mamba2.py, arc/kernels.py), on the CPU reference path.

- the chunked SSD against a naive float64 sequential recurrence: outputs, final state and gradients;
- chunk-size invariance and lengths that are not a multiple of the chunk;
- the conv and scan decoding steps against the full-sequence ops;
- parameter names and shapes against a snapshot of ``mamba_ssm`` 2.3.2's own ``Mamba2``
  (tests/data/mamba_ssm_mamba2_snapshot.json), its initialisation ranges, and its own output on
  recorded weights (the real module's step() path, run when the snapshot was made);
- the kernel choice: the reference path is forced by the switch and CPU tensors never take kernels.

Regenerate the snapshot from the real source (no GPU needed: the CUDA/Triton imports are stubbed,
the real ``Mamba2.__init__`` and ``RMSNorm.__init__`` run)::

    pip download --no-deps --no-binary :all: --no-clean mamba-ssm==2.3.2.post1   # keep the unpacked sdist
    PYTHONPATH=/path/to/einops python tests/test_mamba2.py /path/to/unpacked/mamba_ssm-2.3.2.post1
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arc import kernels
from arc.mamba2 import Mamba2, MambaState, init_A_log, init_dt_bias

SNAPSHOT = Path(__file__).parent / "data" / "mamba_ssm_mamba2_snapshot.json"
# Tolerance for float64 comparisons of the chunked form against the sequential recurrence: the two
# sum the same terms in a different order, so they agree to rounding (~1e-15); 1e-10 leaves room.
TOL64 = 1e-10


def sequential_ssd(x, dt, A, B, C, D, initial=None):
    """The recurrence one step at a time, in whatever dtype it is given (float64 in these tests).
    x (b, l, h, p), dt (b, l, h) after softplus, A (h,), B C (b, l, g, n), D (h,)."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    s = torch.zeros(b, h, p, n, dtype=x.dtype) if initial is None else initial.clone()
    Bh, Ch = B.repeat_interleave(h // g, dim=2), C.repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    ys = []
    for t in range(l):
        s = s * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((s * Ch[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), s


def random_scan_inputs(b=2, l=37, h=4, p=8, g=2, n=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt_raw = torch.randn(b, l, h, generator=gen, dtype=dtype)
    A = -torch.empty(h, dtype=dtype).uniform_(0.5, 8.0, generator=gen)
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype)
    dt_bias = torch.randn(h, generator=gen, dtype=dtype)
    return x, dt_raw, A, B, C, D, dt_bias


# ---- the scan -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_chunked_ssd_matches_sequential_recurrence_outputs_state_and_gradients(chunk):
    inputs = [t.requires_grad_() for t in random_scan_inputs()]
    x, dt_raw, A, B, C, D, dt_bias = inputs
    with kernels.reference_path():
        y, state = kernels.ssd(x, dt_raw, A, B, C, D, dt_bias, chunk, return_state=True)
    y_ref, state_ref = sequential_ssd(x, F.softplus(dt_raw + dt_bias), A, B, C, D)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=TOL64)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=TOL64)
    w_y, w_s = torch.randn_like(y), torch.randn_like(state)
    grads = torch.autograd.grad((y * w_y).sum() + (state * w_s).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * w_y).sum() + (state_ref * w_s).sum(), inputs)
    for name, g, g_ref in zip("x dt A B C D dt_bias".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=TOL64, msg=lambda m, name=name: f"grad {name}: {m}")


def test_chunked_ssd_initial_state_continues_a_sequence():
    x, dt_raw, A, B, C, D, dt_bias = random_scan_inputs(l=40)
    dt = F.softplus(dt_raw + dt_bias)
    y_full, s_full = kernels.ssd_chunked_ref(x, dt, A, B, C, 8)
    y1, s1 = kernels.ssd_chunked_ref(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8)
    y2, s2 = kernels.ssd_chunked_ref(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, rtol=0, atol=TOL64)
    torch.testing.assert_close(s2, s_full, rtol=0, atol=TOL64)


@pytest.mark.parametrize("length", [1, 31, 64, 100, 257])
def test_ssd_float32_is_chunk_size_invariant_for_any_length(length):
    x, dt_raw, A, B, C, D, dt_bias = [t.float() for t in random_scan_inputs(b=1, l=length, h=4, p=16, g=1, n=16)]
    with kernels.reference_path():
        outs = [kernels.ssd(x, dt_raw, A, B, C, D, dt_bias, q, return_state=True) for q in (32, 64, 256)]
    for y, s in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s, outs[0][1], rtol=1e-4, atol=1e-5)
    assert outs[0][0].shape == (1, length, 4, 16)


def test_reference_batch_pieces_do_not_change_results(monkeypatch):
    inputs = [t.float().requires_grad_() for t in random_scan_inputs(b=5, l=20)]
    x, dt_raw, A, B, C, D, dt_bias = inputs
    weight, bias = torch.randn(8, 1, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    u = torch.randn(5, 20, 8, requires_grad=True)

    def run():
        y, s = kernels.ssd(x, dt_raw, A, B, C, D, dt_bias, 8, return_state=True)
        conv = kernels.causal_conv1d(u, weight, bias)
        loss = (y * torch.arange(y.numel()).view_as(y).sin()).sum() + s.square().sum() + conv.square().sum()
        return [y, s, conv, *torch.autograd.grad(loss, inputs + [weight, bias, u])]

    with kernels.reference_path():  # the pieces are the reference twin's (the C++ twin takes the batch whole)
        whole = run()
        monkeypatch.setattr(kernels, "REF_TOKENS_PER_PIECE", 40)  # pieces of 2 sequences: 2 + 2 + 1
        assert len(kernels._batch_pieces(x)) == 3
        for a, b in zip(run(), whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ssd_long_sequence_with_strong_decay_stays_finite():
    """dt * A summed over a chunk reaches -1e3: a naive exp of cumsum differences would overflow."""
    x, dt_raw, A, B, C, D, dt_bias = [t.float() for t in random_scan_inputs(b=1, l=300, h=2, p=4, g=1, n=4)]
    dt_raw = dt_raw.abs() + 5.0
    A = torch.full_like(A, -16.0)
    x.requires_grad_()
    with kernels.reference_path():
        y, s = kernels.ssd(x, dt_raw, A, B, C, D, dt_bias, 256, return_state=True)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(s).all() and torch.isfinite(x.grad).all()


def test_segsum_is_the_sum_between_positions():
    a = torch.randn(3, 6, dtype=torch.float64)
    out = kernels.segsum(a)
    for i in range(6):
        for j in range(6):
            if j <= i:
                assert torch.allclose(out[:, i, j], a[:, j + 1:i + 1].sum(-1))
            else:
                assert torch.isinf(out[:, i, j]).all() and (out[:, i, j] < 0).all()


# ---- steps against the full-sequence ops ---------------------------------------------------------
def test_conv_step_matches_causal_conv():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 12, generator=gen)
    weight, bias = torch.randn(12, 1, 4, generator=gen), torch.randn(12, generator=gen)
    full = kernels.causal_conv1d(x, weight, bias)
    ref = F.silu(F.conv1d(x.transpose(1, 2), weight, bias, padding=3, groups=12)[..., :9]).transpose(1, 2)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6)
    state = torch.zeros(2, 12, 3)
    steps = torch.stack([kernels.conv_step(x[:, t], state, weight, bias) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


def test_ssd_step_matches_scan():
    x, dt_raw, A, B, C, D, dt_bias = random_scan_inputs(l=11)
    y, s_final = kernels.ssd(x, dt_raw, A, B, C, D, dt_bias, 4, return_state=True)
    state = torch.zeros_like(s_final)
    steps = torch.stack([kernels.ssd_step(state, x[:, t], dt_raw[:, t], A, B[:, t], C[:, t], D, dt_bias)
                         for t in range(11)], dim=1)
    torch.testing.assert_close(steps, y, rtol=0, atol=TOL64)
    torch.testing.assert_close(state, s_final, rtol=0, atol=TOL64)


def test_mamba2_layer_prefill_then_steps_equal_full_forward():
    torch.manual_seed(0)
    m = Mamba2(32, d_state=8, headdim=16, ngroups=2, chunk_size=8).eval()
    u = torch.randn(3, 21, 32)
    full, _ = m(u)
    with torch.no_grad():
        pre, state = m(u[:, :2], return_state=True)  # shorter than d_conv - 1 + 1: conv state is zero padded
        outs = [pre] + [m.step(u[:, t], state)[:, None] for t in range(2, 21)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "closed form"])
def test_mamba2_extend_equals_steps_and_commit_keeps_any_number_of_tokens(path, monkeypatch):
    """The speculative decoder's verification: T tokens at once give the outputs of T steps, and the
    state committed after each sequence's own number of kept tokens is the state those steps left
    (float64: exactly the recurrence; the state itself is left alone by extend). Both ways: T fused
    C++ steps on copies of the states, and the scan written out in closed form (elsewhere)."""
    from arc.mamba2 import MambaPending, MambaPendingFused

    if path == "closed form":
        monkeypatch.setattr(kernels, "fused_step_ok", lambda *args: False)
    torch.manual_seed(0)
    m = Mamba2(32, d_state=8, headdim=16, ngroups=2, chunk_size=8).double().eval()
    prompt, new = torch.randn(4, 9, 32, dtype=torch.float64), torch.randn(4, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        _, start = m(prompt, return_state=True)
        start = MambaState(start.conv.double(), start.ssm.double())
        stepped, after = MambaState(start.conv.clone(), start.ssm.clone()), []
        outs = []
        for t in range(6):
            outs.append(m.step(new[:, t], stepped))
            after.append(MambaState(stepped.conv.clone(), stepped.ssm.clone()))
        before = MambaState(start.conv.clone(), start.ssm.clone())
        y, pending = m.extend(new, start)
    assert isinstance(pending, MambaPendingFused if path == "fused" else MambaPending)
    assert torch.equal(start.ssm, before.ssm) and torch.equal(start.conv, before.conv)  # extend only reads it
    torch.testing.assert_close(y, torch.stack(outs, dim=1), rtol=0, atol=TOL64)
    last = torch.tensor([0, 5, 2, 3])
    pending.commit(start, last)
    for i, t in enumerate(last.tolist()):
        torch.testing.assert_close(start.ssm[i], after[t].ssm[i], rtol=0, atol=TOL64)
        torch.testing.assert_close(start.conv[i], after[t].conv[i], rtol=0, atol=0)


# ---- names, shapes and init against mamba_ssm ---------------------------------------------------
def _snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


def test_snapshot_is_from_mamba_ssm_2_3_2():
    snap = _snapshot()
    assert snap["mamba_ssm_version"].startswith("2.3.2")
    assert len(snap["cases"]) >= 3


@pytest.mark.parametrize("case", range(4))
def test_state_dict_names_and_shapes_match_mamba_ssm(case):
    c = _snapshot()["cases"][case]
    ours = Mamba2(**c["kwargs"]).state_dict()
    assert [(k, list(v.shape)) for k, v in ours.items()] == list(c["state_dict"].items())  # names, shapes, order
    # a state dict of mamba_ssm's shapes loads strictly, and the values arrive
    theirs = {k: torch.randn(shape) for k, shape in c["state_dict"].items()}
    m = Mamba2(**c["kwargs"])
    m.load_state_dict(theirs, strict=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in theirs.items())


def test_forward_and_steps_reproduce_mamba_ssm_own_output_on_recorded_weights():
    """The recorded output is mamba_ssm's Mamba2.step run token by token on these weights."""
    rec = _snapshot()["parity"]
    m = Mamba2(**rec["kwargs"], chunk_size=4).eval()
    m.load_state_dict({k: torch.tensor(v) for k, v in rec["state_dict"].items()}, strict=True)
    u, expected = torch.tensor(rec["input"]), torch.tensor(rec["output"])  # (2, 13, 8) each
    with torch.no_grad():
        y, _ = m(u)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        state = m.allocate_state(2, "cpu")
        steps = torch.stack([m.step(u[:, t], state) for t in range(u.shape[1])], dim=1)
        torch.testing.assert_close(steps, expected, rtol=1e-4, atol=1e-5)


def test_init_matches_mamba_ssm_ranges():
    snap = _snapshot()["init"]
    torch.manual_seed(0)
    dt = F.softplus(init_dt_bias(4096))
    assert dt.min() >= snap["dt_min"] * (1 - 1e-5) and dt.max() <= snap["dt_max"] * (1 + 1e-5)
    # log-uniform: the median of log dt sits in the middle of [log dt_min, log dt_max]
    assert abs(dt.log().median().item() - (math.log(snap["dt_min"]) + math.log(snap["dt_max"])) / 2) < 0.15
    floored = F.softplus(init_dt_bias(64, dt_min=1e-6, dt_max=1e-5))
    torch.testing.assert_close(floored, torch.full_like(floored, snap["dt_init_floor"]), rtol=1e-4, atol=0)
    A = init_A_log(4096).exp()
    lo, hi = snap["A_init_range"]
    assert A.min() >= lo and A.max() <= hi and abs(A.mean().item() - (lo + hi) / 2) < 0.5
    m = Mamba2(32, d_state=8, headdim=16)
    assert torch.equal(m.D.detach(), torch.ones(4)) and torch.equal(m.norm.weight.detach(), torch.ones(64))


# ---- the choice ----------------------------------------------------------------------------------
def test_cpu_tensors_never_take_kernels_and_the_switch_forces_reference():
    assert not kernels.use_kernels(torch.zeros(1))
    before = kernels._forced
    try:
        kernels.force_reference(True)
        assert "forced" in kernels.describe()
        assert not kernels.use_kernels(torch.zeros(1))
        with kernels.reference_path():
            assert kernels._forced
        assert kernels._forced  # the context manager restores what was there
    finally:
        kernels.force_reference(before)
    assert kernels.describe().startswith("Mamba2 path")


def test_force_reference_environment_variable_is_read_at_import(tmp_path):
    import subprocess
    code = "import arc.kernels as k; print(k._forced, k.describe())"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "ARC_FORCE_REFERENCE": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("True") and "forced" in out


# ---- regenerating the snapshot from the real source --------------------------------------------
CASES = [
    dict(d_model=32, d_state=16, headdim=16, expand=2, d_conv=4, ngroups=1),
    dict(d_model=64, d_state=32, headdim=32, expand=2, d_conv=3, ngroups=2),
    dict(d_model=256, d_state=64, headdim=64, expand=2, d_conv=4, ngroups=1),  # the "cpu" preset's mixer
    dict(d_model=512, d_state=128, headdim=64, expand=2, d_conv=4, ngroups=1),  # the "gpu" preset's mixer
]


PARITY = dict(d_model=8, d_state=4, headdim=4, expand=2, d_conv=4, ngroups=1)


def _load_real_mamba2(root: Path):
    """mamba_ssm's Mamba2 class from its source, with the CUDA/Triton-only imports stubbed and the real
    RMSNorm class (layernorm_gated.py) executed on its own with the file's rms_norm_ref as its norm.
    Without causal_conv1d and selective_state_update, the real ``Mamba2.step`` is pure PyTorch."""
    pkg = root / "mamba_ssm"
    ln_src = (pkg / "ops/triton/layernorm_gated.py").read_text()
    import einops  # mamba_ssm's own dependency; only needed to regenerate

    # the real RMSNorm class and its pure-PyTorch rms_norm_ref, standing in for the Triton rmsnorm_fn
    nodes = [n for n in ast.parse(ln_src).body if getattr(n, "name", None) in ("RMSNorm", "rms_norm_ref")]
    ln_mod = types.ModuleType("mamba_ssm.ops.triton.layernorm_gated")
    ln_mod.__dict__.update(torch=torch, F=F, rearrange=einops.rearrange)
    exec(compile(ast.Module(nodes, []), str(pkg / "ops/triton/layernorm_gated.py"), "exec"), ln_mod.__dict__)
    ln_mod.rmsnorm_fn = ln_mod.rms_norm_ref

    def stub(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    def unavailable(*_a, **_k):
        raise RuntimeError("stub: CUDA kernel not available")

    stubs = {
        "mamba_ssm": stub("mamba_ssm"), "mamba_ssm.ops": stub("mamba_ssm.ops"),
        "mamba_ssm.ops.triton": stub("mamba_ssm.ops.triton"),
        "mamba_ssm.ops.triton.layernorm_gated": ln_mod,
        "mamba_ssm.ops.triton.ssd_combined": stub("mamba_ssm.ops.triton.ssd_combined", mamba_chunk_scan_combined=unavailable,
                                                  mamba_split_conv1d_scan_combined=unavailable),
        "mamba_ssm.distributed": stub("mamba_ssm.distributed"),
        "mamba_ssm.distributed.tensor_parallel": stub("mamba_ssm.distributed.tensor_parallel", ColumnParallelLinear=None,
                                                      RowParallelLinear=None),
        "mamba_ssm.distributed.distributed_utils": stub("mamba_ssm.distributed.distributed_utils", all_reduce=None,
                                                        reduce_scatter=None),
        "huggingface_hub": stub("huggingface_hub", PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {})),
    }
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        src = (pkg / "modules/mamba2.py").read_text()
        mod = types.ModuleType("mamba_ssm.modules.mamba2")
        exec(compile(src, str(pkg / "modules/mamba2.py"), "exec"), mod.__dict__)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod.Mamba2, src


def regenerate(root: Path) -> None:
    Mamba2Real, src = _load_real_mamba2(root)
    version = (root / "mamba_ssm/__init__.py").read_text().split('__version__ = "')[1].split('"')[0]
    cases = []
    for kw in CASES:
        m = Mamba2Real(**kw)
        cases.append({"kwargs": {**kw, "chunk_size": 256},
                      "state_dict": {k: list(v.shape) for k, v in m.state_dict().items()}})
    # the real module's own numbers: its step() run token by token (its pure-PyTorch decoding path)
    torch.manual_seed(0)
    m = Mamba2Real(**PARITY)
    with torch.no_grad():
        for prm in m.parameters():  # move D and the norm weight off 1 so that they are tested too
            prm.add_(0.1 * torch.randn_like(prm))
        u = torch.randn(2, 13, PARITY["d_model"])
        conv_state, ssm_state = m.allocate_inference_cache(2, 13)
        out = torch.cat([m.step(u[:, t:t + 1], conv_state, ssm_state)[0] for t in range(13)], dim=1)
    parity = {"kwargs": PARITY, "state_dict": {k: v.tolist() for k, v in m.state_dict().items()},
              "input": u.tolist(), "output": out.tolist()}
    snap = {
        "what": "parameter names and shapes of mamba_ssm.modules.mamba2.Mamba2 (defaults otherwise), read from "
                "the real module built from its source; 'parity': its weights, an input and the output of its "
                "own step() path; regenerate with `python tests/test_mamba2.py <sdist dir>` (needs einops)",
        "mamba_ssm_version": version,
        "mamba2_py_sha256": hashlib.sha256(src.encode()).hexdigest(),
        "init": {"dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "A_init_range": [1, 16]},
        "cases": cases,
        "parity": parity,
    }
    text = json.dumps(snap, indent=1)
    text = re.sub(r"\[\s*([^\[\]]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)  # short lists on one line
    SNAPSHOT.write_text(text + "\n")
    print(f"wrote {SNAPSHOT} from mamba_ssm {version}")


if __name__ == "__main__":
    regenerate(Path(sys.argv[1]))
