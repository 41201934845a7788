"""The compute ops of the Mamba2 mixer, in two interchangeable twins, and the one place that chooses.

Every op here has one signature and two bodies:

- the **kernel** twin calls the fused CUDA/Triton kernels of ``mamba_ssm`` (and ``causal_conv1d`` when
  it is installed);
- the **reference** twin is pure PyTorch: a causal depthwise conv, the chunked SSD form of the scan
  (matrix multiplies, with a numerically stable segment sum), one-token recurrence steps and a gated
  RMSNorm. It is what the kernel twins are tested against;
- on a CPU, the **C++** twin (:mod:`arc.cpu_scan`, built from ``arc/csrc/ssd_cpu.cpp`` on first use)
  runs the scan as the plain recurrence, the conv and the gated norm, forward and backward, each in
  one pass; where it cannot be built, CPU tensors take the reference twin and the reason is logged.

The GPU choice is made once, at import: the kernels are used when CUDA is available and their import
succeeds. A failing import (``ImportError``, or the ``OSError``/``RuntimeError`` a CUDA extension
built against another torch raises) is caught, named, and logged once; nothing else is changed (the
model config never is). Tensors on the CPU never take the CUDA kernels; they take the C++ twin
where it builds. Force the reference twin everywhere with ``ARC_FORCE_REFERENCE=1`` in the
environment or :func:`force_reference` (tests use :func:`reference_path` as a context manager).

Shapes, as in ``mamba_ssm``: ``b`` batch, ``l`` length, ``h`` heads, ``p`` head dim, ``g`` groups,
``n`` state size, ``d`` conv channels (``h*p + 2*g*n``), ``w`` conv width.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from arc import cpu_scan

logger = logging.getLogger(__name__)

FORCE_ENV = "ARC_FORCE_REFERENCE"


# ---- the choice ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernels:
    """What the import found. ``available`` is True when the SSD kernels can be used at all."""

    available: bool
    reason: str  # why the kernels are or are not used, for the one log line
    chunk_scan: Callable | None = None  # mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined
    state_update: Callable | None = None  # mamba_ssm.ops.triton.selective_state_update.selective_state_update
    conv_fn: Callable | None = None  # causal_conv1d.causal_conv1d_fn (optional)
    conv_update: Callable | None = None  # causal_conv1d.causal_conv1d_update (optional)


# What a broken CUDA extension raises on import: ImportError (undefined symbol, missing module),
# OSError (a shared library not found), RuntimeError (torch/CUDA version checks at import).
_IMPORT_ERRORS = (ImportError, OSError, RuntimeError)


def _probe() -> Kernels:
    if not torch.cuda.is_available():
        return Kernels(False, "no CUDA device")
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except _IMPORT_ERRORS as e:
        return Kernels(False, f"mamba_ssm kernels failed to import: {type(e).__name__}: {e}")
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        conv_note = "causal_conv1d"
    except _IMPORT_ERRORS as e:
        causal_conv1d_fn = causal_conv1d_update = None
        conv_note = f"plain depthwise conv (causal_conv1d: {type(e).__name__}: {e})"
    return Kernels(True, f"mamba_ssm Triton SSD kernels + {conv_note}", mamba_chunk_scan_combined,
                   selective_state_update, causal_conv1d_fn, causal_conv1d_update)


KERNELS: Kernels = _probe()
_forced: bool = os.environ.get(FORCE_ENV, "0") not in ("", "0")


def describe(build: bool = True) -> str:
    """One line saying which Mamba2 path CUDA and CPU tensors take, and why. ``build=False`` does not
    build the CPU extension to say so (the import-time line)."""
    if _forced:
        return f"Mamba2 path: pure-PyTorch reference (forced; kernels: {KERNELS.reason})"
    if build or cpu_scan.tried():
        cpu = "C++ scan, conv and gated norm" if cpu_scan.available() else f"pure-PyTorch reference ({cpu_scan.reason()})"
    else:
        cpu = "C++ scan, conv and gated norm if they build (on first use)"
    if KERNELS.available:
        return f"Mamba2 path: fused kernels on CUDA tensors ({KERNELS.reason}); CPU tensors: {cpu}"
    return f"Mamba2 path on CPU: {cpu}; no GPU kernels ({KERNELS.reason})"


if KERNELS.available or not torch.cuda.is_available():
    logger.info(describe(build=False))
else:  # a GPU without its kernels is slow: say so loudly
    logger.warning(describe(build=False))


def force_reference(flag: bool = True) -> None:
    """Make every op take the reference twin (``flag=False`` restores the import-time choice)."""
    global _forced
    _forced = bool(flag)


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """``with reference_path():`` runs the block on the reference twin, then restores the choice."""
    global _forced
    before = _forced
    _forced = True
    try:
        yield
    finally:
        _forced = before


def use_kernels(t: torch.Tensor) -> bool:
    """True when an op on ``t`` takes the kernel twin: kernels imported, not forced off, CUDA tensor."""
    return KERNELS.available and not _forced and t.is_cuda


def use_cpu_scan(t: torch.Tensor) -> bool:
    """True when the scan on ``t`` takes the C++ twin (arc/cpu_scan.py): a CPU tensor, not forced onto
    the reference, and the extension built (the first call builds it)."""
    return t.device.type == "cpu" and not _forced and cpu_scan.available()


# ---- reference twins ----------------------------------------------------------------------------
def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: ``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for j <= i, -inf above.

    Summing the masked entries directly (a cumulative sum down each column) instead of subtracting
    two prefix sums avoids cancellation between large prefix sums; -inf makes ``exp`` exactly 0
    there, so no inf * 0 reaches the gradients.
    """
    t = a.size(-1)
    ones = torch.ones(t, t, dtype=torch.bool, device=a.device)
    cols = a.unsqueeze(-1).expand(*a.shape, t).masked_fill(~ones.tril(-1), 0.0)  # [..., k, j] = a[k] if k > j
    out = cols.cumsum(dim=-2)  # (..., t, t): [..., i, j] = sum_{j < k <= i} a[k]
    return out.masked_fill(~ones.tril(0), float("-inf"))


def ssd_chunked_ref(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int, initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan in chunked (matrix) form, without the D skip.

    Computes ``s_t = exp(dt_t * A) s_{t-1} + dt_t x_t B_t^T`` and ``y_t = s_t C_t`` for every t, by
    splitting the sequence into chunks: inside a chunk the outputs are one masked matrix product;
    between chunks only the state (h, p, n) is carried. Any length: the tail is padded with dt = 0,
    which leaves the state unchanged, so the final state is exact.

    x (b, l, h, p), dt (b, l, h) after softplus, A (h,) negative, B and C (b, l, g, n),
    initial_state (b, h, p, n) or None. Returns y (b, l, h, p) and the final state (b, h, p, n),
    both float32 or the inputs' wider dtype (float64 in tests).
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    r = h // g  # heads per group
    q = chunk_size
    pad = (-l) % q
    if pad:
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (l + pad) // q
    # Layout: keep x in its natural (b, c, q, h, p) order wherever a product allows it; permute copies
    # of (b, l, h, p) tensors are as costly as the products at these sizes.
    a = (dt * A).reshape(b, c, q, h).transpose(-1, -2)  # (b, c, h, q) log-decay per step, <= 0
    a_cum = a.cumsum(dim=-1)  # (b, c, h, q) decay from the chunk start to step i
    xdt = x.reshape(b, c, q, h, p) * dt.reshape(b, c, q, h, 1)  # (b, c, q, h, p)
    Bg = B.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)
    Cg = C.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, q, n)

    # 1. within each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
    decay = torch.exp(segsum(a)).view(b, c, g, r, q, q)  # (b, c, g, r, q, q)
    scores = (Cg @ Bg.transpose(-1, -2)).unsqueeze(3) * decay  # (b, c, g, r, q, q)
    y = scores @ xdt.view(b, c, q, g, r, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, r, q, p)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c, q, h, p)  # (b, c, q, h, p)

    # 2. each chunk's own contribution to the state at its end: sum_j exp(a_{j+1} + ... + a_end) dt_j x_j B_j^T
    to_end = torch.exp(a_cum[..., -1:] - a_cum).transpose(-1, -2).unsqueeze(-1)  # (b, c, q, h, 1)
    weighted = (xdt * to_end).view(b, c, q, g, r * p).transpose(2, 3)  # (b, c, g, q, r*p)
    chunk_states = (weighted.transpose(-1, -2) @ Bg).view(b, c, h, p, n)  # (b, c, h, p, n)

    # 3. the state entering each chunk, carried across chunks: one cheap step per chunk
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # (b, c, h, 1, 1)
    state = torch.zeros(b, h, p, n, dtype=xdt.dtype, device=x.device) if initial_state is None \
        else initial_state.to(xdt.dtype)  # (b, h, p, n)
    entering = []
    # unbind once: indexing [:, k] in the loop would cost a full-size zero gradient per chunk
    for decay_k, contrib_k in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        entering.append(state)
        state = state * decay_k + contrib_k  # (b, h, p, n)
    states_in = torch.stack(entering, dim=1).view(b, c, g, r * p, n)  # (b, c, g, r*p, n)

    # 4. the entering state's contribution: y_i += exp(a_1 + ... + a_i) C_i . s_k
    from_state = (Cg @ states_in.transpose(-1, -2)).transpose(2, 3).reshape(b, c, q, h, p)  # (b, c, q, h, p)
    y = y + from_state * torch.exp(a_cum).transpose(-1, -2).unsqueeze(-1)  # (b, c, q, h, p)
    return y.reshape(b, c * q, h, p)[:, :l], state


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU of a causal depthwise conv along time: x (b, l, d), weight (d, 1, w), bias (d,) -> (b, l, d)."""
    # w shifted multiply-adds in the (b, l, d) layout: on a CPU this beats F.conv1d, which needs
    # (b, d, l) copies in and out
    l, w = x.shape[1], weight.shape[-1]
    xp = F.pad(x, (0, 0, w - 1, 0))  # (b, l + w - 1, d) zeros before the first step
    taps = weight[:, 0, :]  # (d, w) tap k multiplies the input w-1-k steps back
    y = xp[:, w - 1:] * taps[:, w - 1]  # (b, l, d)
    for k in range(w - 1):
        y = y + xp[:, k:k + l] * taps[:, k]
    return F.silu(y if bias is None else y + bias)


def conv_step_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """One step of :func:`causal_conv1d_ref`: x (b, d), conv_state (b, d, w-1) the previous inputs,
    updated in place. Returns (b, d)."""
    window = torch.cat([conv_state, x.to(conv_state.dtype).unsqueeze(-1)], dim=-1)  # (b, d, w)
    conv_state.copy_(window[..., 1:])
    out = (window * weight.squeeze(1)).sum(dim=-1)  # (b, d)
    if bias is not None:
        out = out + bias
    return F.silu(out)


def ssd_step_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                 B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """One step of the scan, without D: state (b, h, p, n) updated in place, x (b, h, p),
    dt (b, h) after softplus, A (h,), B and C (b, g, n). Returns y (b, h, p)."""
    h, g = x.shape[1], B.shape[1]
    Bh = B.repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.repeat_interleave(h // g, dim=1)  # (b, h, n)
    decay = torch.exp(dt * A)[..., None, None]  # (b, h, 1, 1)
    state.copy_(state * decay + (dt[..., None] * x)[..., None] * Bh[:, :, None, :])  # (b, h, p, n)
    return (state @ Ch.unsqueeze(-1)).squeeze(-1)  # (b, h, p)


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """``mamba_ssm``'s gated RMSNorm with norm_before_gate=False: RMS-normalise ``y * silu(z)`` over
    each group of ``group_size`` channels, then scale by ``weight``. Computed in float32, returned
    in y's dtype. y, z (..., d), weight (d,)."""
    if use_cpu_scan(y):
        with torch.autocast(device_type="cpu", enabled=False):
            return cpu_scan.gated_rmsnorm(y, z, weight, eps, group_size)
    return gated_rmsnorm_ref(y, z, weight, eps, group_size)


def gated_rmsnorm_ref(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """The reference twin of :func:`gated_rmsnorm` (plain PyTorch)."""
    with torch.autocast(device_type=y.device.type, enabled=False):
        wide = torch.promote_types(y.dtype, torch.float32)
        u = y.to(wide) * F.silu(z.to(wide))  # (..., d)
        groups = u.unflatten(-1, (-1, group_size))  # (..., d / group_size, group_size)
        normed = groups * torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + eps)
        return (normed.flatten(-2) * weight.to(wide)).to(y.dtype)


# ---- the ops the model calls: one signature, the choice made here -------------------------------
def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, dt_bias: torch.Tensor, chunk_size: int, return_state: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Mamba2 scan with the D skip: ``y_t = C_t s_t + D x_t`` with ``dt = softplus(dt + dt_bias)``.

    x (b, l, h, p), dt (b, l, h) raw (before bias and softplus), A (h,) negative, B and C (b, l, g, n),
    D and dt_bias (h,). Returns y (b, l, h, p) in x's dtype and, if ``return_state``, the final
    state (b, h, p, n) in float32 (else None).
    """
    if use_kernels(x):
        out = KERNELS.chunk_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                                 return_final_states=return_state)
        return (out[0], out[1]) if return_state else (out, None)
    with torch.autocast(device_type=x.device.type, enabled=False):
        wide = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(wide) + dt_bias.to(wide))  # (b, l, h)
        xw, A, B, C = x.to(wide), A.to(wide), B.to(wide), C.to(wide)
        if use_cpu_scan(x):
            y, state = cpu_scan.scan(xw, dt, A, B, C)
            return (y + D.to(wide)[:, None] * xw).to(x.dtype), (state if return_state else None)
        parts = [ssd_chunked_ref(xw[s], dt[s], A, B[s], C[s], chunk_size) for s in _batch_pieces(x)]
        y = torch.cat([part[0] for part in parts]) if len(parts) > 1 else parts[0][0]  # (b, l, h, p)
        y = y + D.to(wide)[:, None] * xw
        state = torch.cat([part[1] for part in parts]) if len(parts) > 1 else parts[0][1]  # (b, h, p, n)
        return y.to(x.dtype), (state if return_state else None)


# On a CPU the reference twins are bound by memory traffic, not arithmetic, once a batch's
# intermediates outgrow the cache: on a 2-core EPYC (32 MiB L3) a Mamba2 layer's forward+backward on
# 4 x 4096 tokens took 1.0 s run as four pieces of 4096 tokens against 1.5 s in one piece.
# Sequences are never split, only the batch; on a GPU the batch stays whole.
REF_TOKENS_PER_PIECE = 4096


def _batch_pieces(x: torch.Tensor) -> list[slice]:
    """Slices of x's batch (dim 0) of about REF_TOKENS_PER_PIECE tokens each (at least one sequence)."""
    b, l = x.shape[0], x.shape[1]
    if x.device.type != "cpu":
        return [slice(0, b)]
    per = max(1, REF_TOKENS_PER_PIECE // max(l, 1))
    return [slice(i, min(i + per, b)) for i in range(0, b, per)]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(causal depthwise conv): x (b, l, d), weight (d, 1, w) as in ``nn.Conv1d``, bias (d,) -> (b, l, d)."""
    w = weight.shape[-1]
    if use_kernels(x) and KERNELS.conv_fn is not None and 2 <= w <= 4:
        xt = x.transpose(1, 2)  # (b, d, l)
        channel_last_ok = xt.stride(1) == 1 and xt.size(1) % 8 == 0 and xt.stride(0) % 8 == 0 and xt.stride(2) % 8 == 0
        if not (xt.stride(2) == 1 or channel_last_ok):
            xt = xt.contiguous()
        return KERNELS.conv_fn(xt, weight.squeeze(1), bias, activation="silu").transpose(1, 2)
    if use_cpu_scan(x):
        with torch.autocast(device_type="cpu", enabled=False):
            return cpu_scan.conv(x, weight, bias)
    pieces = _batch_pieces(x)
    if len(pieces) == 1:
        return causal_conv1d_ref(x, weight, bias)
    return torch.cat([causal_conv1d_ref(x[s], weight, bias) for s in pieces])  # (b, l, d)


def conv_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One decoding step of :func:`causal_conv1d`: x (b, d), conv_state (b, d, w-1) updated in place -> (b, d)."""
    w = weight.shape[-1]
    if use_kernels(x) and KERNELS.conv_update is not None and 2 <= w <= 4:
        return KERNELS.conv_update(x.to(conv_state.dtype), conv_state, weight.squeeze(1), bias, "silu")
    return conv_step_ref(x, conv_state, weight, bias)


def fused_step_ok(zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> bool:
    """True when a Mamba2 decoding step can run as one C++ call (:func:`arc.cpu_scan.mixer_step_`):
    CPU tensors, the C++ twin in use, no gradient recorded, states contiguous and of one float32/64 dtype."""
    return (not use_kernels(zxbcdt) and use_cpu_scan(zxbcdt) and cpu_scan.outside_autograd(zxbcdt)
            and conv_state.is_contiguous() and ssm_state.is_contiguous()
            and conv_state.dtype == ssm_state.dtype and ssm_state.dtype in (torch.float32, torch.float64))


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """One decoding step of :func:`ssd`: state (b, h, p, n) float32 updated in place, x (b, h, p),
    dt (b, h) raw, B and C (b, g, n). Returns y (b, h, p) in float32."""
    if use_kernels(x):
        b, h, p = x.shape
        n = state.shape[-1]
        return KERNELS.state_update(  # expanded (stride-0) views are what the kernel expects for tied head dims
            state, x.float(), dt.float()[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n),
            B.float(), C.float(), D=D[:, None].expand(h, p), z=None, dt_bias=dt_bias[:, None].expand(h, p),
            dt_softplus=True)
    with torch.autocast(device_type=x.device.type, enabled=False):
        wide = state.dtype
        dt = F.softplus(dt.to(wide) + dt_bias.to(wide))  # (b, h)
        xw = x.to(wide)
        if (use_cpu_scan(x) and cpu_scan.outside_autograd(x, dt, A, B, C) and state.is_contiguous()
                and state.dtype in (torch.float32, torch.float64)):
            return cpu_scan.step_(state, xw, dt, A, B, C) + D.to(wide)[:, None] * xw
        y = ssd_step_ref(state, xw, dt, A.to(wide), B.to(wide), C.to(wide))  # (b, h, p)
        return y + D.to(wide)[:, None] * xw
