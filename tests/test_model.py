"""The language model (arc/model.py) on a CPU: config, presets, loss, causality, checkpoints,
parameter groups and cached decoding (prefill + step equal the full forward)."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arc import kernels
from arc.mamba2 import Mamba2, MambaState
from arc.model import PRESETS, HybridLM, InferenceCache, KVCache, ModelConfig, preset
from arc.tokens import IGNORE_INDEX, POS_MAPS, VOCAB_SIZE

SNAPSHOT = Path(__file__).parent / "data" / "mamba_ssm_mamba2_snapshot.json"


def tiny(**overrides) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(preset("tiny", **overrides)).eval()


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("d_model", 0), ("n_layer", -1), ("layer_pattern", "MXA"), ("layer_pattern", ""), ("layer_pattern", "MMA"),
    ("headdim", 48), ("ngroups", 3), ("n_head", 3), ("dropout", 1.0), ("d_conv", 1), ("mlp_hidden", -4),
    ("chunk_size", 0), ("vocab_size", 2.5), ("tie_embeddings", "yes"), ("max_seq_len", 0),
    ("mamba_scan", ""), ("mamba_scan", "rx"), ("mamba_scan", ["r"]),
])
def test_config_validation_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        ModelConfig(**{**dict(d_model=64, n_layer=4), field: value})


def test_config_round_trips_through_a_json_dict_and_rejects_unknown_fields():
    cfg = preset("cpu", dropout=0.1, tie_embeddings=False)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown fields.*'n_embd'"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_embd": 3})
    assert ModelConfig.from_dict({}) == ModelConfig()


def test_every_config_field_has_a_help_line():
    import dataclasses
    for f in dataclasses.fields(ModelConfig):
        assert f.metadata.get("help"), f.name


def test_layer_pattern_is_data_gpt_and_pure_mamba_are_expressible():
    assert preset("cpu").layer_kinds == "MMMAMMMA"
    gpt = HybridLM(ModelConfig(d_model=32, n_layer=2, layer_pattern="A", n_head=2, max_seq_len=64))
    mamba = HybridLM(ModelConfig(d_model=32, n_layer=2, layer_pattern="M", headdim=16, d_state=8, chunk_size=8, max_seq_len=64))
    assert all(isinstance(b.mixer, Mamba2) for b in mamba.layers)
    assert not any(isinstance(b.mixer, Mamba2) for b in gpt.layers)
    idx = torch.randint(0, VOCAB_SIZE, (2, 20))
    for m in (gpt, mamba):
        logits, _ = m(idx)
        assert logits.shape == (2, 20, VOCAB_SIZE)


def test_presets_build_and_have_the_documented_sizes():
    assert set(PRESETS) == {"tiny", "cpu", "gpu"}
    assert set(preset("tiny").layer_kinds) == {"M", "A"}
    n_cpu = HybridLM(preset("cpu")).num_params()
    assert 2e6 < n_cpu < 6e6, n_cpu
    with torch.device("meta"):  # no memory, no init cost
        n_gpu = HybridLM(preset("gpu")).num_params()
    assert 15e6 < n_gpu < 60e6, n_gpu
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")


# ---- forward, loss, causality -------------------------------------------------------------------
def test_loss_is_cross_entropy_over_targets_and_ignores_minus_100():
    m = tiny()
    idx = torch.randint(0, VOCAB_SIZE, (2, 30))
    y = torch.randint(0, VOCAB_SIZE, (2, 30))
    y[:, :17] = IGNORE_INDEX
    logits, loss = m(idx, y)
    keep = y != IGNORE_INDEX
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], y[keep]))
    _, loss_all_ignored = m(idx, torch.full_like(y, IGNORE_INDEX))
    assert loss_all_ignored.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_changing_token_t_never_changes_earlier_logits():
    m = tiny()
    idx = torch.randint(0, VOCAB_SIZE, (1, 40))
    base, _ = m(idx)
    for t in (0, 7, 16, 39):  # inside the first chunk, at a chunk boundary (chunk 16), the last token
        other = idx.clone()
        other[0, t] = (other[0, t] + 1) % VOCAB_SIZE
        logits, _ = m(other)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(logits[:, t], base[:, t])


def test_eval_is_deterministic_with_dropout_and_train_is_not():
    m = tiny(dropout=0.5)
    idx = torch.randint(0, VOCAB_SIZE, (1, 24))
    assert torch.equal(m(idx)[0], m(idx)[0])
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])


def test_forward_rejects_too_long_and_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="max_seq_len 512"):
        m(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be \(B, T\)"):
        m(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1])
def test_one_bf16_step_has_the_float32_loss_and_gradients(seed):
    """bf16 autocast against float32 on the same weights and batch (CPU, the fast Mamba2 path).
    Tolerances, from what was measured (worst over seeds 0-2): loss within 1e-3 relative (seen 5e-5);
    all gradients together within 2% in L2 (seen 0.5%); each parameter's gradient pointing the same
    way, cosine >= 0.99 (seen >= 0.998; small gradients such as A_log's differ most)."""
    torch.manual_seed(seed)
    m = HybridLM(preset("tiny"))
    idx = torch.randint(0, VOCAB_SIZE, (2, 100))

    def one_step(bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, loss = m(idx, idx)
        assert logits.dtype == (torch.bfloat16 if bf16 else torch.float32)  # autocast really ran
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}

    loss32, grads32 = one_step(False)
    loss16, grads16 = one_step(True)
    assert loss16 == pytest.approx(loss32, rel=1e-3)
    flat32, flat16 = torch.cat([g.flatten() for g in grads32.values()]), torch.cat([g.flatten() for g in grads16.values()])
    assert (flat16 - flat32).norm() <= 0.02 * flat32.norm()
    for name, g in grads32.items():
        assert grads16[name].dtype == torch.float32, name  # float32 master weights get float32 gradients
        assert F.cosine_similarity(grads16[name].flatten(), g.flatten(), dim=0) >= 0.99, name
    mixer = m.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32


# ---- parameters, init, checkpoints --------------------------------------------------------------
def test_param_groups_cover_every_parameter_once_and_skip_decay_on_ssm_scalars():
    m = tiny()
    groups = m.param_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    no_decay = m.no_decay_names()
    for suffix in ("A_log", "D", "dt_bias", "norm.weight", "conv1d.bias"):
        assert any(n.endswith(suffix) for n in no_decay), suffix
    assert not any(n.endswith(("in_proj.weight", "out_proj.weight")) for n in no_decay)
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1


def test_init_weights_follows_its_table():
    torch.manual_seed(0)
    m = HybridLM(preset("cpu"))
    mixer = m.layers[0].mixer
    assert torch.equal(mixer.D.detach(), torch.ones_like(mixer.D))
    dt = F.softplus(mixer.dt_bias.detach())
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    A = mixer.A_log.detach().exp()
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert abs(m.embedding.weight.std().item() - 0.02) < 0.003
    assert abs(mixer.in_proj.weight.std().item() - 0.02) < 0.002
    assert abs(mixer.out_proj.weight.std().item() - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert m.lm_head.weight is m.embedding.weight
    for name in ("norm_f", "layers.3.norm"):
        assert torch.equal(m.get_submodule(name).weight.detach(), torch.ones(256))


def test_checkpoint_state_dict_loads_strictly_and_reproduces_logits():
    m = tiny()
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "model_config": m.cfg.to_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    m2 = HybridLM(ModelConfig.from_dict(ckpt["model_config"])).eval()
    m2.load_state_dict(ckpt["model"], strict=True)
    idx = torch.randint(0, VOCAB_SIZE, (1, 25))
    assert torch.equal(m(idx)[0], m2(idx)[0])
    assert not any("rotary" in k for k in ckpt["model"])  # derived buffers are not saved


class FakeKernels:
    """CPU stand-ins with the signatures and semantics of the fused kernels arc.kernels calls
    (mamba_ssm's ``mamba_chunk_scan_combined`` and ``selective_state_update``, causal_conv1d's
    ``causal_conv1d_fn`` and ``causal_conv1d_update``), written independently of the reference
    twins where that is short, and counting their calls."""

    def __init__(self) -> None:
        self.calls = {"chunk_scan": 0, "state_update": 0, "conv_fn": 0, "conv_update": 0}

    def kernels(self) -> kernels.Kernels:
        return kernels.Kernels(True, "fake kernels (tests)", self.chunk_scan, self.state_update, self.conv_fn,
                               self.conv_update)

    def chunk_scan(self, x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False, return_final_states=False):
        self.calls["chunk_scan"] += 1
        dt = dt.float() + dt_bias.float()
        dt = F.softplus(dt) if dt_softplus else dt  # (b, l, h)
        y, state = kernels.ssd_chunked_ref(x.float(), dt, A.float(), B.float(), C.float(), chunk_size)
        y = (y + D.float()[:, None] * x.float()).to(x.dtype)  # (b, l, h, p)
        return (y, state) if return_final_states else y

    def state_update(self, state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        """x (b, h, p), dt (b, h, p), A (h, p, n), B and C (b, g, n), D and dt_bias (h, p)."""
        self.calls["state_update"] += 1
        assert z is None
        dt = dt + dt_bias
        dt = F.softplus(dt) if dt_softplus else dt  # (b, h, p)
        heads_per_group = x.shape[1] // B.shape[1]
        Bh, Ch = B.repeat_interleave(heads_per_group, 1), C.repeat_interleave(heads_per_group, 1)  # (b, h, n)
        state.copy_(state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * Bh[:, :, None, :])  # (b, h, p, n)
        return (state * Ch[:, :, None, :]).sum(-1) + D * x  # (b, h, p)

    def conv_fn(self, x, weight, bias=None, activation=None):
        """x (b, d, l), weight (d, w) -> (b, d, l)."""
        self.calls["conv_fn"] += 1
        y = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
        return F.silu(y) if activation == "silu" else y

    def conv_update(self, x, conv_state, weight, bias=None, activation=None):
        """x (b, d), conv_state (b, d, w - 1) updated in place, weight (d, w) -> (b, d)."""
        self.calls["conv_update"] += 1
        window = torch.cat([conv_state, x[..., None]], dim=-1)  # (b, d, w)
        conv_state.copy_(window[..., 1:])
        y = (window * weight).sum(-1) + (0 if bias is None else bias)
        return F.silu(y) if activation == "silu" else y


def test_use_kernels_is_the_switch_reference_path_and_force_reference_flip(monkeypatch):
    """Kernels are taken only when imported, not forced off, and on a CUDA tensor; the switches
    flip that and restore it, also when the block raises."""
    class CudaTensor:  # stands for a CUDA tensor: use_kernels reads only .is_cuda
        is_cuda = True

    monkeypatch.setattr(kernels, "KERNELS", FakeKernels().kernels())
    monkeypatch.setattr(kernels, "_forced", False)
    assert kernels.use_kernels(CudaTensor()) and not kernels.use_kernels(torch.zeros(1))
    with pytest.raises(RuntimeError):
        with kernels.reference_path():
            assert not kernels.use_kernels(CudaTensor())
            raise RuntimeError
    assert kernels.use_kernels(CudaTensor())
    kernels.force_reference(True)
    assert not kernels.use_kernels(CudaTensor())
    kernels.force_reference(False)
    assert kernels.use_kernels(CudaTensor())
    monkeypatch.setattr(kernels, "KERNELS", kernels.Kernels(False, "none"))
    assert not kernels.use_kernels(CudaTensor())


def test_the_kernel_path_code_matches_the_reference_path_with_stand_in_kernels(monkeypatch):
    """The code arc.kernels runs around the fused kernels (argument order, layouts, the D skip, dt's
    bias and softplus) checked on a CPU: with stand-ins computing what the kernels compute, the model
    gives the reference path's logits, gradients and decoding steps; every op took the kernel route
    outside ``reference_path()`` and none inside; the parameters are the same either way."""
    fake = FakeKernels()
    monkeypatch.setattr(kernels, "KERNELS", fake.kernels())
    monkeypatch.setattr(kernels, "_forced", False)
    # a CPU tensor is never routed to kernels; here it is, so that the kernel route runs at all
    monkeypatch.setattr(kernels, "use_kernels", lambda t: kernels.KERNELS.available and not kernels._forced)
    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB_SIZE, (2, 40))

    def run() -> tuple[dict, torch.Tensor, dict, list[torch.Tensor]]:
        m = tiny()
        logits, loss = m.train()(idx, idx)
        loss.backward()
        m.eval()
        with torch.no_grad():
            cache, first = m.prefill([idx[0, :30], idx[1, :21]], 5)
            steps = [first] + [m.step(torch.stack([idx[0, 30 + t], idx[1, 21 + t]]), cache) for t in range(5)]
        return m.state_dict(), logits.detach(), {n: p.grad for n, p in m.named_parameters()}, steps

    state_k, logits_k, grads_k, steps_k = run()
    assert all(n > 0 for n in fake.calls.values()), fake.calls
    calls = dict(fake.calls)
    with kernels.reference_path():
        state_r, logits_r, grads_r, steps_r = run()
    assert fake.calls == calls  # the reference path touched no kernel
    assert {k: v.shape for k, v in state_k.items()} == {k: v.shape for k, v in state_r.items()}
    torch.testing.assert_close(logits_k, logits_r, rtol=1e-4, atol=1e-5)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_k[name], g, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(steps_k, steps_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_model_mixers_use_mamba_ssm_names_and_shapes():
    case = json.loads(SNAPSHOT.read_text())["cases"][2]  # d_model 256, d_state 64, headdim 64: the cpu preset
    assert {k: case["kwargs"][k] for k in ("d_model", "d_state", "headdim")} == \
           {k: getattr(preset("cpu"), k) for k in ("d_model", "d_state", "headdim")}
    sd = HybridLM(preset("cpu")).state_dict()
    mixer = {k[len("layers.0.mixer."):]: list(v.shape) for k, v in sd.items() if k.startswith("layers.0.mixer.")}
    assert mixer == case["state_dict"]


def test_flops_estimate_counts_matmuls_and_grows_with_attention_length():
    m = HybridLM(preset("cpu"))
    f1, f4 = m.estimate_flops_per_token(1024), m.estimate_flops_per_token(4096)
    assert f1 > 6 * (m.num_params() - m.embedding.weight.numel())
    assert f4 - f1 == pytest.approx(2 * 12 * 256 * 3072)  # two attention layers


def test_2d_options_round_trip_through_a_checkpoint_and_old_configs_keep_the_old_model(tmp_path):
    from arc import checkpoint
    enc = _instances(1, seed=4)[0]
    ids, pos = torch.as_tensor(enc.ids)[None], torch.as_tensor(enc.pos)[None]
    m = tiny(grid_pos=True, align_input=True, align_maps=True, map_agree=True, map_gate=3.0, rope="grid", mamba_scan="rc")
    checkpoint.save_atomic({"model": m.state_dict(), "model_config": m.cfg.to_dict()}, tmp_path / "c.pt")
    saved = checkpoint.load(tmp_path / "c.pt")
    back = HybridLM(ModelConfig.from_dict(saved["model_config"])).eval()
    back.load_state_dict(saved["model"])  # strict: the new embeddings are in the state dict
    assert (back.cfg.grid_pos, back.cfg.align_input, back.cfg.align_maps, back.cfg.map_agree, back.cfg.map_gate,
            back.cfg.rope, back.cfg.mamba_scan) == (True, True, True, True, 3.0, "grid", "rc")
    torch.testing.assert_close(back(ids, pos=pos)[0], m(ids, pos=pos)[0], rtol=0, atol=0)
    # a config written before these fields existed builds the model it described: no new parameters
    old = {k: v for k, v in tiny().cfg.to_dict().items()
           if k not in ("grid_pos", "align_input", "align_maps", "map_agree", "map_gate", "rope", "mamba_scan")}
    plain = HybridLM(ModelConfig.from_dict(old))
    assert not plain.cfg.uses_positions and plain.cfg.mamba_scan == "r"
    assert plain.state_dict().keys() == tiny().state_dict().keys()


# ---- cached decoding ----------------------------------------------------------------------------
def _check_decoding(m: HybridLM, prompt_lengths, new_tokens: int, atol: float = 2e-5):
    gen = torch.Generator().manual_seed(3)
    full = [torch.randint(0, VOCAB_SIZE, (n + new_tokens,), generator=gen) for n in prompt_lengths]
    prompts = [f[:n] for f, n in zip(full, prompt_lengths)]
    ref = [m(f[None])[0][0] for f in full]  # (n + new, V) each
    cache, logits = m.prefill(prompts, new_tokens)
    assert isinstance(cache, InferenceCache) and logits.shape == (len(prompts), VOCAB_SIZE)
    for i, n in enumerate(prompt_lengths):
        torch.testing.assert_close(logits[i], ref[i][n - 1], rtol=0, atol=atol)
    for t in range(new_tokens):
        logits = m.step(torch.stack([f[n + t] for f, n in zip(full, prompt_lengths)]), cache)
        for i, n in enumerate(prompt_lengths):
            torch.testing.assert_close(logits[i], ref[i][n + t], rtol=0, atol=atol)
    return cache


@pytest.mark.parametrize("piece", [1, 45, 80, 10**6])
def test_prefill_then_steps_equal_full_forward_for_a_batch_of_different_lengths(piece, monkeypatch):
    """Whatever the prefill's piece size (PREFILL_TOKENS): each prompt alone (1); the three 5s
    together, the two 1s together, the two 40s apart (45); the two 40s together too (80); each
    length in one piece (10**6). Prompts of different lengths never share a piece."""
    import arc.model as model_module
    monkeypatch.setattr(model_module, "PREFILL_TOKENS", piece)
    m = tiny()
    cache = _check_decoding(m, [5, 40, 17, 40, 1, 5, 5, 1], new_tokens=7)
    assert cache.lengths.tolist() == [12, 47, 24, 47, 8, 12, 12, 8]
    kinds = [type(s) for s in cache.layers]
    assert kinds == [MambaState, MambaState, KVCache, MambaState]


def test_decoding_works_for_pure_attention_and_pure_mamba_under_inference_mode():
    for pattern, extra in (("A", {}), ("M", {"mlp_hidden": 0})):
        m = tiny(layer_pattern=pattern, n_layer=2, **extra)
        with torch.inference_mode():
            _check_decoding(m, [3, 20], new_tokens=4)


def _instances(n: int, seed: int):
    """Real ARC layouts (random grids), so the 2D channels mean something."""
    import numpy as np

    from arc.tokens import encode_instance
    rng = np.random.default_rng(seed)
    def grid():
        return rng.integers(0, 10, (int(rng.integers(1, 6)), int(rng.integers(1, 6))))
    return [encode_instance([(grid(), grid()) for _ in range(int(rng.integers(1, 4)))], grid(), grid()) for _ in range(n)]


@pytest.mark.parametrize("options", [dict(grid_pos=True), dict(align_input=True), dict(rope="grid"),
                                     dict(grid_pos=True, align_input=True, rope="mirror"), dict(rope="dihedral"),
                                     dict(align_maps=True), dict(grid_pos=True, align_input=True, align_maps=True, rope="mirror"),
                                     dict(align_input=True, align_maps=True, map_agree=True),
                                     dict(align_input=True, align_maps=True, map_agree=True, map_gate=4.0),
                                     dict(align_maps=True, map_gate=1.0), dict(mamba_scan="c"),
                                     dict(grid_pos=True, align_input=True, rope="mirror", mamba_scan="rc")])
@pytest.mark.parametrize("piece", [1, 10**6])
def test_prefill_then_steps_equal_full_forward_with_2d_positions(options, piece, monkeypatch):
    from arc.tokens import OUT
    import arc.model as model_module
    monkeypatch.setattr(model_module, "PREFILL_TOKENS", piece)
    m = tiny(**options)
    encs = _instances(4, seed=1)
    # two lengths twice, the copies with other colours (same layout, other ids): with pieces of
    # 10**6 tokens each pair shares one, and a row mix-up inside it would change the logits
    encs = encs + [dataclasses.replace(e, ids=np.where(np.asarray(e.ids) < 10, (np.asarray(e.ids) + 3) % 10, e.ids))
                   for e in encs[:2]]
    cuts = [int(max(i for i, t in enumerate(e.ids) if t == OUT)) + 1 for e in encs]  # each prompt ends at the test's OUT
    full = [(torch.as_tensor(e.ids), torch.as_tensor(e.pos)) for e in encs]
    ref = [m(ids[None], pos=pos[None])[0][0] for ids, pos in full]  # (L, V) each
    cache, logits = m.prefill([ids[:c] for (ids, _), c in zip(full, cuts)], 40, [pos[:c] for (_, pos), c in zip(full, cuts)])
    for i, c in enumerate(cuts):
        torch.testing.assert_close(logits[i], ref[i][c - 1], rtol=0, atol=2e-5)
    new = min(len(e.ids) - c for e, c in zip(encs, cuts))
    for t in range(new):
        tok = torch.stack([ids[c + t] for (ids, _), c in zip(full, cuts)])
        pos = torch.stack([p[c + t] for (_, p), c in zip(full, cuts)])
        logits = m.step(tok, cache, pos)
        for i, c in enumerate(cuts):
            torch.testing.assert_close(logits[i], ref[i][c + t], rtol=0, atol=2e-5)


@pytest.mark.parametrize("options", [dict(), dict(grid_pos=True, align_input=True, rope="mirror"),
                                     dict(rope="dihedral"), dict(align_input=True, align_maps=True),
                                     dict(align_input=True, align_maps=True, map_agree=True),
                                     dict(align_input=True, align_maps=True, map_agree=True, map_gate=4.0),
                                     dict(align_maps=True, map_gate=1.0),
                                     dict(grid_pos=True, align_input=True, rope="mirror", mamba_scan="cr")])
@pytest.mark.parametrize("fused", [True, False])
def test_extend_then_commit_equals_steps_for_any_number_of_kept_tokens(options, fused, monkeypatch):
    """Speculative decoding's verification: T tokens per sequence in one extend give the logits of T
    steps; committing a different number of them per sequence leaves the cache as that many steps
    would, so the next steps' logits are the full forward's. The Mamba2 layers both ways: fused C++
    steps, and the closed form."""
    from arc import kernels
    from arc.tokens import OUT
    if not fused:
        monkeypatch.setattr(kernels, "fused_step_ok", lambda *args: False)
    m = tiny(**options)
    encs = _instances(4, seed=8)  # every answer at least 13 tokens
    cuts = [int(max(i for i, t in enumerate(e.ids) if t == OUT)) + 1 for e in encs]
    full = [(torch.as_tensor(e.ids), torch.as_tensor(e.pos)) for e in encs]
    ref = [m(ids[None], pos=pos[None])[0][0] for ids, pos in full]  # (L, V) each
    cache, _ = m.prefill([ids[:c] for (ids, _), c in zip(full, cuts)], 40, [pos[:c] for (_, pos), c in zip(full, cuts)])
    new = min(len(e.ids) - c for e, c in zip(encs, cuts))
    t = min(new - 2, 5)
    assert t == 5
    toks = torch.stack([ids[c:c + t] for (ids, _), c in zip(full, cuts)])  # (B, T)
    pos = torch.stack([p[c:c + t] for (_, p), c in zip(full, cuts)])  # (B, T, N_POS)
    logits, pending = m.extend(toks, cache, pos)
    from arc.mamba2 import MambaPendingFused
    assert any(isinstance(p, MambaPendingFused) for p in pending) == fused  # the path asked for ran
    assert logits.shape == (4, t, VOCAB_SIZE) and logits.dtype == torch.float32
    for i, c in enumerate(cuts):
        torch.testing.assert_close(logits[i], ref[i][c:c + t], rtol=0, atol=2e-5)
    kept = torch.tensor([0, t - 1, 1, 2])  # the last kept token's index, per sequence
    m.commit(cache, pending, kept)
    assert cache.lengths.tolist() == [c + k + 1 for c, k in zip(cuts, kept.tolist())]
    if m.cfg.reads_before:  # the cells the next token's slot reads: those of each sequence's last kept token
        for i, ((ids, p), c, k) in enumerate(zip(full, cuts, kept.tolist())):
            aligned = m.aligned_ids(ids[None], p[None])
            assert torch.equal(cache.last_aligned[i], aligned[0, c + k])
            if m.cfg.map_gate:  # and map_gate's counts up to that token
                assert torch.equal(cache.map_counts[i], m._map_counts(ids[None], m._before(aligned))[0, c + k])
    for step in range(2):  # each sequence goes on from its own last kept token
        at = [c + k + 1 + step for c, k in zip(cuts, kept.tolist())]
        tok = torch.stack([ids[a] for (ids, _), a in zip(full, at)])
        p = torch.stack([q[a] for (_, q), a in zip(full, at)])
        out = m.step(tok, cache, p)
        for i, a in enumerate(at):
            torch.testing.assert_close(out[i], ref[i][a], rtol=0, atol=2e-5)


def test_extend_refuses_more_tokens_than_the_cache_holds():
    m = tiny()
    cache, _ = m.prefill([torch.zeros(4, dtype=torch.long)], 3)
    with pytest.raises(ValueError, match="do not fit"):
        m.extend(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="tokens must have shape"):
        m.extend(torch.zeros(2, 1, dtype=torch.long), cache)


def test_2d_positions_change_the_logits_and_are_required_when_configured():
    enc = _instances(1, seed=2)[0]
    ids, pos = torch.as_tensor(enc.ids)[None], torch.as_tensor(enc.pos)[None]
    m = tiny(grid_pos=True, align_input=True, rope="mirror")
    with pytest.raises(ValueError, match="takes 2D positions"):
        m(ids)
    with pytest.raises(ValueError, match="takes 2D positions"):
        m.prefill([ids[0]], 4)
    moved = pos.clone()
    moved[..., 0] = (moved[..., 0] + 1) % 31  # every row one further down
    assert not torch.allclose(m(ids, pos=pos)[0], m(ids, pos=moved)[0])
    maps = tiny(grid_pos=True, align_input=True, align_maps=True, rope="mirror")
    with pytest.raises(ValueError, match="takes 2D positions"):
        tiny(align_maps=True)(ids)
    no_maps = pos.clone()
    no_maps[..., POS_MAPS:] = 0  # the same layout without the other maps' cells
    assert (pos[..., POS_MAPS:] > 0).any()
    assert not torch.allclose(maps(ids, pos=pos)[0], maps(ids, pos=no_maps)[0])
    torch.testing.assert_close(m(ids, pos=pos)[0], m(ids, pos=no_maps)[0], rtol=0, atol=0)  # only align_maps reads them
    assert maps(ids[:0], pos=pos[:0])[0].shape == (0, ids.shape[1], VOCAB_SIZE)  # an empty batch still runs
    plain = tiny()  # the default config ignores positions entirely
    torch.testing.assert_close(plain(ids)[0], plain(ids, pos=moved)[0], rtol=0, atol=0)


def test_mamba_state_size_does_not_depend_on_prompt_length():
    m = tiny(layer_pattern="M", n_layer=2)
    short, _ = m.prefill([torch.zeros(3, dtype=torch.long)], 1)
    long, _ = m.prefill([torch.zeros(300, dtype=torch.long)], 1)
    for a, b in zip(short.layers, long.layers):
        assert a.conv.shape == b.conv.shape and a.ssm.shape == b.ssm.shape


def test_cache_select_drops_sequences_and_the_rest_continue_exactly():
    m = tiny()
    gen = torch.Generator().manual_seed(5)
    full = [torch.randint(0, VOCAB_SIZE, (n + 4,), generator=gen) for n in (9, 23, 14)]
    lens = [9, 23, 14]
    cache, _ = m.prefill([f[:n] for f, n in zip(full, lens)], 4)
    m.step(torch.stack([f[n] for f, n in zip(full, lens)]), cache)
    kept = [2, 0]
    assert cache.select(torch.tensor(kept)) is cache and cache.batch_size == 2
    cache = cache.select(torch.arange(2))  # keeping everyone changes nothing
    for t in (1, 2):
        logits = m.step(torch.stack([full[i][lens[i] + t] for i in kept]), cache)
        for row, i in enumerate(kept):
            ref = m(full[i][None, :lens[i] + t + 1])[0][0, -1]
            torch.testing.assert_close(logits[row], ref, rtol=0, atol=2e-5)
    with pytest.raises(IndexError):
        cache.select(torch.tensor([2]))
    cache.select(torch.tensor([], dtype=torch.long))  # everyone finished
    assert m.step(torch.zeros(0, dtype=torch.long), cache).shape == (0, VOCAB_SIZE)


def test_step_refuses_to_overrun_the_cache_and_prefill_checks_lengths():
    m = tiny()
    cache, _ = m.prefill([torch.zeros(4, dtype=torch.long)], 1)
    m.step(torch.zeros(1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cache is full"):
        m.step(torch.zeros(1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_seq_len 512"):
        m.prefill([torch.zeros(500, dtype=torch.long)], 13)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty 1-D"):
        m.prefill([torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long)], 1)


def test_mirror_rotary_makes_the_mirrored_input_cell_a_fixed_relative_offset():
    """With rope='mirror', the part of q.k rotated by the mirrored column depends only on the output
    column minus the input column counted from the right edge, whatever the grid's width."""
    import numpy as np

    from arc.model import Rotary
    from arc.tokens import encode_instance
    rot = Rotary(16, 512, 10000.0, "mirror")  # head dims: 8 by sequence, then 2 each by row, col, mirrored row, col
    q = torch.zeros(1, 1, 1, 16)
    q[..., 14] = 1.0  # the first dim of the mirrored-column part
    scores = []
    for width in (5, 9):
        enc = encode_instance([(np.zeros((1, width), int), np.zeros((1, width), int))], np.zeros((1, 1), int),
                              np.zeros((1, 1), int))
        pos = torch.as_tensor(enc.pos)[None]  # (1, L, N_POS)
        out_at = lambda c: 1 + 1 + (width + 1) + 1 + c  # BOS, IN, the input row + ROW, OUT, then the output cells
        in_at = lambda c: 2 + c
        def score(i, j):
            qi = rot(q, torch.tensor([[i]]), pos[:, i:i + 1])
            kj = rot(q, torch.tensor([[j]]), pos[:, j:j + 1])
            return float((qi[..., 14:] * kj[..., 14:]).sum())
        scores.append([score(out_at(c), in_at(width - 1 - c)) for c in range(min(width, 5))])  # the mirrored cells
        assert score(out_at(0), in_at(0)) < scores[-1][0] - 1e-3  # an unmirrored cell scores lower
    assert np.allclose(scores[0], scores[0][0]) and np.allclose(scores[1], scores[0][0])


@pytest.mark.parametrize("rope", ["seq", "grid", "mirror", "dihedral"])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_rotary_one_pass_equals_the_part_by_part_reference(rope, per_sequence):
    """Rotary.apply (whole-head tables, one pass) equals apply_reference (each part rotated on its own
    by _rotate) for every rope, with shared (T,) and per-sequence (B, T) positions, and keeps the norm."""
    import numpy as np

    from arc.model import Rotary
    from arc.tokens import encode_instance
    rot = Rotary(32, 512, 10000.0, rope)
    rng = np.random.default_rng(0)
    encs = [encode_instance([(rng.integers(0, 10, (h, w)), rng.integers(0, 10, (w, h)))], rng.integers(0, 10, (h, w)),
                            rng.integers(0, 10, (w, h))) for h, w in ((3, 5), (4, 2))]
    t = min(len(e.ids) for e in encs)
    pos = torch.stack([torch.as_tensor(e.pos[:t]) for e in encs])  # (2, T, N_POS), two different layouts
    positions = torch.arange(t) + 3
    if per_sequence:
        positions = torch.stack([positions, positions + 7])  # (2, T)
    x = torch.randn(2, 4, t, 32, dtype=torch.bfloat16)
    fast = rot.apply(x, rot.tables(positions, pos))
    slow = rot.apply_reference(x, rot.part_tables(positions, pos))
    assert fast.dtype == x.dtype and fast.shape == x.shape
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0, atol=0)
    torch.testing.assert_close(fast.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2, atol=0)
    assert not torch.equal(fast, x)


@pytest.mark.parametrize("rope", ["mirror", "dihedral"])
def test_dihedral_rotary_makes_every_rotation_and_reflection_a_fixed_relative_offset(rope):
    """For each of the 8 rotations/reflections of a 3x4 input, some head group has a row-like and a
    column-like part in which every output cell's source cell in the input is at offset 0 (q.k of
    rotated all-ones vectors is maximal only at offset 0). With rope='mirror' the 4 that transpose
    the grid have none; with 'dihedral' all 8 do."""
    import numpy as np

    from arc.model import Rotary
    from arc.tokens import encode_instance
    rot = Rotary(32, 512, 10000.0, rope)
    n_groups = len(rot.groups)
    h, w = 3, 4
    index = np.arange(h * w).reshape(h, w)  # an input cell's number
    maps = [lambda g: g, np.fliplr, np.flipud, lambda g: np.rot90(g, 2), lambda g: g.T, np.rot90,
            lambda g: np.rot90(g, 3), lambda g: np.rot90(g, 2).T]
    found = []
    for f in maps:
        source = f(index)  # output cell -> the input cell it copies
        enc = encode_instance([(index % 10, source % 10)], np.zeros((1, 1), int), np.zeros((1, 1), int))
        pos = torch.as_tensor(enc.pos)[None]
        in_at = lambda k: 2 + (k // w) * (w + 1) + k % w  # BOS, IN, then rows of w cells + ROW
        out_start = 2 + h * (w + 1) + 1  # after the input's rows and OUT
        ow = source.shape[1]
        ones = torch.ones(1, n_groups, 1, 32)
        def part_scores(i, j):  # (groups, parts): q.k of each part between tokens i and j
            qi = rot(ones, torch.tensor([[i]]), pos[:, i:i + 1])[0, :, 0]
            kj = rot(ones, torch.tensor([[j]]), pos[:, j:j + 1])[0, :, 0]
            prod, start, out = qi * kj, 0, []
            for dims in rot.dims:
                out.append(prod[:, start:start + dims].sum(-1))
                start += dims
            return torch.stack(out, dim=1)
        at_zero = torch.ones(n_groups, len(rot.dims), dtype=torch.bool)
        for r in range(source.shape[0]):
            for c in range(ow):
                s = part_scores(out_start + r * (ow + 1) + c, in_at(int(source[r, c])))
                at_zero &= torch.isclose(s, torch.tensor(rot.dims, dtype=torch.float32).expand_as(s), atol=1e-4)
        cell = at_zero[:, 1:]  # the 2D parts
        found.append(bool((cell.sum(dim=1) >= 2).any()))
    assert found == ([True] * 4 + [False] * 4 if rope == "mirror" else [True] * 8)


def test_a_column_scan_is_the_row_scan_of_the_sequence_read_column_by_column():
    """Pure Mamba2 with no position inputs: layers that scan input grids by columns give, on a
    sequence, the logits the same weights give to that sequence reordered by column_order and
    scanned as written, put back in place."""
    from arc.tokens import column_order
    cols = tiny(layer_pattern="M", n_layer=2, mamba_scan="c")
    rows = tiny(layer_pattern="M", n_layer=2)
    rows.load_state_dict(cols.state_dict())
    assert cols.cfg.column_scans == [True, True] and rows.cfg.column_scans == [False, False]
    for e in _instances(3, seed=5):
        ids, pos = torch.as_tensor(e.ids)[None], torch.as_tensor(e.pos)[None]
        order, place = column_order(pos)
        assert not torch.equal(order, torch.arange(ids.shape[1])[None])  # something moves
        want = rows(ids.gather(1, order))[0].gather(1, place[..., None].expand(-1, -1, VOCAB_SIZE))
        torch.testing.assert_close(cols(ids, pos=pos)[0], want, rtol=0, atol=1e-5)
    assert tiny(mamba_scan="rc").cfg.column_scans == [False, True, False, False]  # MMAM: the Mamba2 layers cycle r, c


@pytest.mark.parametrize("scan", ["cr", "rc"])
def test_each_mamba2_layer_reads_in_its_own_letter_s_order(scan):
    """Layer by layer by hand: a Mamba2 layer whose letter is c runs its mixer on the normed input
    reordered by column_order and puts the result back; one whose letter is r runs it as written."""
    from arc.tokens import column_order
    m = tiny(mamba_scan=scan, grid_pos=True, align_input=True, rope="mirror")  # MMAM: letters cycle over the three
    e = _instances(1, seed=6)[0]
    ids, pos = torch.as_tensor(e.ids)[None], torch.as_tensor(e.pos)[None]
    order, place = (i[..., None].expand(-1, -1, m.cfg.d_model) for i in column_order(pos))
    letters = iter(scan * 4)
    x = m.input_vectors(ids, pos)
    for block in m.layers:
        h = block.norm(x)
        if block.kind == "A":
            h = block.mixer(h, pos=pos)[0]
        elif next(letters) == "c":
            h = block.mixer(h.gather(1, order))[0].gather(1, place)
        else:
            h = block.mixer(h)[0]
        x = x + h
        x = x + block.mlp(block.norm2(x))
    torch.testing.assert_close(m(ids, pos=pos)[0], m.lm_head(m.norm_f(x)), rtol=0, atol=1e-5)


def test_a_column_scan_sees_the_cell_below_and_never_an_output_token_ahead():
    """Under mamba_scan "c", an input cell's result depends on the cell below it in the previous
    column (read before it), not on the next cell of its row (read after it); the tokens before the
    grid keep their logits, and so does every token before a changed output token."""
    from arc.tokens import IN, KIND_OUTPUT, POS_KIND, encode_instance
    grid = np.arange(12).reshape(3, 4) % 10
    enc = encode_instance([(grid, grid[::-1])], grid, grid.T)
    ids, pos = torch.as_tensor(enc.ids)[None], torch.as_tensor(enc.pos)[None]
    assert enc.ids[1] == IN
    def at(r: int, c: int) -> int:  # the first input grid's cell (r, c): after BOS, IN, and r rows of 4 + ROW
        return 2 + r * 5 + c
    for scan, below_matters in (("c", True), ("r", False)):
        m = tiny(layer_pattern="M", n_layer=2, mamba_scan=scan)
        base = m(ids, pos=pos)[0]
        for changed, seen_at, matters in ((at(1, 0), at(0, 1), below_matters), (at(0, 2), at(0, 1), False)):
            other = ids.clone()
            other[0, changed] = (other[0, changed] + 1) % 10
            logits = m(other, pos=pos)[0]
            torch.testing.assert_close(logits[:, :2], base[:, :2], rtol=0, atol=0)  # BOS, IN
            assert torch.allclose(logits[:, seen_at], base[:, seen_at]) != matters
        outs = [i for i, p in enumerate(enc.pos) if p[POS_KIND] == KIND_OUTPUT and enc.ids[i] < 10]  # output cells
        for t in (outs[0], outs[-1]):
            other = ids.clone()
            other[0, t] = (other[0, t] + 1) % 10
            torch.testing.assert_close(m(other, pos=pos)[0][:, :t], base[:, :t], rtol=0, atol=0)


def test_map_agree_marks_exactly_the_maps_each_output_cell_agrees_with():
    """With map_agree, an output cell's input vector holds one row of agree_embedding per map whose
    input cell (for this cell's own slot) has its colour: checked against the grids themselves."""
    from arc.tokens import IN, KIND_OUTPUT, MAPS, POS_COL, POS_KIND, POS_ROW, encode_instance, map_cells
    m = tiny(align_input=True, align_maps=True, map_agree=True)
    with torch.no_grad():
        for table in (m.embedding, m.align_embedding, m.map_embedding):
            table.weight.zero_()
        m.agree_embedding.weight.copy_(torch.eye(1 + len(MAPS), m.cfg.d_model))  # row k -> unit vector k
    rng = np.random.default_rng(5)
    for k, name in enumerate(MAPS):
        pairs = []
        for _ in range(3):
            h, w = (int(v) for v in rng.integers(2, 6, 2))
            inp = rng.integers(0, 3, (h, w))  # few colours: other maps often agree too
            oh, ow = (w, h) if name in ("transpose", "antitranspose", "rot90", "rot270") else (h, w)
            out = np.array([[inp[map_cells(r, c, h, w)[k]] for c in range(ow)] for r in range(oh)])
            pairs.append((inp, out))
        enc = encode_instance(pairs[:2], *pairs[2])
        ids, pos = torch.as_tensor(enc.ids), torch.as_tensor(enc.pos)
        got = m.input_vectors(ids[None], pos[None])[0, :, :1 + len(MAPS)].detach()  # (L, 8)
        expected = torch.zeros_like(got)
        pair = -1
        for t in range(len(ids)):
            pair += int(ids[t]) == IN
            inp, out = pairs[pair]
            r, c = int(pos[t, POS_ROW]), int(pos[t, POS_COL])
            if int(pos[t, POS_KIND]) == KIND_OUTPUT and r < out.shape[0] and c < out.shape[1]:
                h, w = inp.shape
                for j, (sr, sc) in enumerate([(r, c)] + map_cells(r, c, h, w)):
                    expected[t, j] = float(0 <= sr < h and 0 <= sc < w and inp[sr, sc] == out[r, c])
        assert expected[:, 1 + k].sum() == sum(o.size for _, o in pairs)  # every output cell agrees with its map
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("power, agree_rows", [(1.0, False), (3.0, False), (2.0, True)])
def test_map_gate_scales_each_map_by_its_agreement_so_far(power, agree_rows):
    """With map_gate, map k's embedding at token t is scaled by (a / r) ** map_gate, r = the tokens up
    to t whose slot reads an input cell under map k, a = those among them whose id is that cell's
    colour: checked against the grids, with the cursor walked by hand (after OUT the cell (0, 0),
    after cell (r, c) the cell (r, c+1), after the ROW ending row r the cell (r+1, 0)). With map_agree
    too, its rows of the maps are scaled the same way and the identity's row is not."""
    from arc.tokens import IN, MAPS, OUT, POS_COL, POS_ROW, ROW, encode_instance, map_cells
    m = tiny(align_input=True, align_maps=True, map_agree=agree_rows, map_gate=power)
    v, n = m.cfg.vocab_size, len(MAPS)
    with torch.no_grad():
        for table in (m.embedding, m.align_embedding, m.map_embedding):
            table.weight.zero_()
        for k in range(len(MAPS)):  # map k's rows of a read cell -> unit vector k ("nothing read" stays 0)
            m.map_embedding.weight[k * (v + 1): k * (v + 1) + v, k] = 1.0
        if agree_rows:  # agreement row j (the identity, then the maps) -> unit vector n + j
            m.agree_embedding.weight.zero_()
            m.agree_embedding.weight[:, n:2 * n + 1] = torch.eye(1 + n)
    rng = np.random.default_rng(11)
    for name in ("flip_h", "rot90", "transpose"):
        k = MAPS.index(name)
        pairs = []
        for j in range(3):
            h, w = (int(x) for x in rng.integers(2, 6, 2))
            inp = rng.integers(0, 3, (h, w))
            oh, ow = (w, h) if name in ("rot90", "transpose") else (h, w)
            out = np.array([[inp[map_cells(r, c, h, w)[k]] for c in range(ow)] for r in range(oh)])
            if j == 1:  # one demonstration not the map (another shape too): the rates drop below 1
                out = rng.integers(0, 3, (int(rng.integers(1, 6)), int(rng.integers(1, 6))))
            pairs.append((inp, out))
        enc = encode_instance(pairs[:2], *pairs[2])
        ids, pos = torch.as_tensor(enc.ids), torch.as_tensor(enc.pos)
        got = m.input_vectors(ids[None], pos[None])[0, :, :2 * n + 1].detach()  # (L, maps, then agreement rows)
        expected = torch.zeros_like(got)
        agree, read = np.zeros(len(MAPS)), np.zeros(len(MAPS))
        pair, cursor = -1, None  # cursor: the output cell the current token's slot is
        for t in range(len(ids)):
            tok = int(ids[t])
            pair += tok == IN
            inp = pairs[pair][0]
            h, w = inp.shape
            hit = np.zeros(1 + n)  # does this token equal the cell its slot reads: the identity, then each map
            if cursor is not None:
                for j, (sr, sc) in enumerate([cursor] + map_cells(*cursor, h, w)):
                    if 0 <= sr < h and 0 <= sc < w:
                        hit[j] = tok == inp[sr, sc]
                        if j:
                            read[j - 1] += 1
                            agree[j - 1] += hit[j]
            gate = (agree / np.maximum(read, 1)) ** power
            if agree_rows:
                expected[t, n] = float(hit[0])
                expected[t, n + 1:] = torch.tensor(hit[1:] * gate, dtype=expected.dtype)
            r, c = int(pos[t, POS_ROW]), int(pos[t, POS_COL])
            after = (0, 0) if tok == OUT else (r + 1, 0) if tok == ROW and cursor is not None \
                else (r, c + 1) if tok < 10 and cursor is not None else None
            for j, (sr, sc) in enumerate(map_cells(*after, h, w) if after is not None else []):
                if 0 <= sr < h and 0 <= sc < w:  # this token's successor's slot reads a cell: map j is embedded
                    expected[t, j] = float(gate[j])
            cursor = after
        assert expected[:, k].max() == 1.0 and 0 < expected[:, :n][expected[:, :n] > 0].min() < 1  # the map open, others part-way
        if agree_rows:  # the identity's row at full weight where the colour stays, maps' rows part-way somewhere
            assert expected[:, n].max() == 1.0 and 0 < expected[:, n + 1:][expected[:, n + 1:] > 0].min() < 1
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_map_gate_needs_the_maps_and_a_power():
    with pytest.raises(ValueError, match="map_gate"):
        ModelConfig(align_input=True, map_gate=4.0)
    with pytest.raises(ValueError, match="map_gate"):
        ModelConfig(align_maps=True, map_gate=-1.0)
    with pytest.raises(ValueError, match="map_gate"):
        ModelConfig(align_maps=True, map_gate=True)
    assert ModelConfig(align_maps=True, map_gate=4).reads_before and not ModelConfig(align_maps=True).reads_before


def test_map_agree_needs_the_cells_it_compares():
    with pytest.raises(ValueError, match="map_agree"):
        ModelConfig(align_maps=True, map_agree=True)
    with pytest.raises(ValueError, match="map_agree"):
        ModelConfig(align_input=True, map_agree=True)
