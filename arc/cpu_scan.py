"""The fast twin of the Mamba2 scan on a CPU: a C++ extension (``arc/csrc/ssd_cpu.cpp``) that runs the
recurrence itself, forward and backward, one (batch row, head) per task on torch's threads.

It is compiled from source on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; about
a minute once per machine, then cached under torch's extensions folder, or ``TORCH_EXTENSIONS_DIR``),
for the CPU it runs on (``-march=native``: the build folder's name carries a hash of the CPU's flags,
so a folder shared between different machines never hands one the other's build). If the build or
the import fails, the reason is logged once and :func:`available` is False: :mod:`arc.kernels` then
keeps the pure-PyTorch chunked reference, which is also what ``ARC_FORCE_REFERENCE=1`` selects.
``ARC_NO_CPU_EXTENSION=1`` skips the build altogether.

Why a recurrence: see the comment at the top of the C++ file. Numerics: float32 (float64 in tests),
the same policy as the reference twin (the scan never runs in bf16).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "ssd_cpu.cpp"
SKIP_ENV = "ARC_NO_CPU_EXTENSION"

_lock = threading.Lock()
_module: ModuleType | None = None
_reason: str | None = None  # why the extension is not used (None: not tried yet, or loaded)
_tried = False


def _cpu_tag() -> str:
    """A short hash of what this CPU can run (its flags), so a build is only reused on a like CPU."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    name = f"arc_ssd_cpu_{_cpu_tag()}"
    return load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                extra_ldflags=["-fopenmp"], verbose=False)


def module() -> ModuleType | None:
    """The compiled extension, building it on the first call; None (reason logged once) if unavailable."""
    global _module, _reason, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get(SKIP_ENV, "0") not in ("", "0"):
            _reason = f"{SKIP_ENV} is set"
        else:
            try:
                _module = _build()
            except Exception as e:  # a missing compiler, ninja or header: fall back, say why
                _reason = f"the C++ scan failed to build or load ({type(e).__name__}: {str(e).strip()[:300]})"
                logger.warning("%s; Mamba2 on CPU uses the pure-PyTorch reference", _reason)
        _tried = True
    return _module


def tried() -> bool:
    """True once a build (or the skip) has been attempted."""
    return _tried


def available() -> bool:
    """True when the C++ scan is built and loaded (builds it if not tried yet)."""
    return module() is not None


def reason() -> str:
    """Why the extension is or is not in use, for the one line arc.kernels logs."""
    if _module is not None:
        return "C++ recurrence scan (arc/csrc/ssd_cpu.cpp)"
    return _reason or "not built yet"


class ScanFn(torch.autograd.Function):
    """``(y, final_state) = scan(x, dt, A, B, C, state0)``: the recurrence, with its exact gradients
    (the backward recomputes the states; nothing but the inputs is kept between the passes)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, state0):  # type: ignore[override]
        y, state = module().forward(x, dt, A, B, C, state0)
        ctx.save_for_backward(x, dt, A, B, C, state0)
        return y, state

    @staticmethod
    def backward(ctx, dy, dstate):  # type: ignore[override]
        x, dt, A, B, C, state0 = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dstate = torch.zeros_like(state0) if dstate is None else dstate.contiguous()
        dx, ddt, dA, dB, dC, dstate0 = module().backward(x, dt, A, B, C, state0, dy, dstate)
        return dx, ddt, dA, dB, dC, dstate0


def scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan without the D skip, as :func:`arc.kernels.ssd_chunked_ref` computes it: x (b, l, h, p),
    dt (b, l, h) after softplus, A (h,), B and C (b, l, g, n), initial_state (b, h, p, n) or None.
    All in one floating dtype (float32 or float64). Returns y (b, l, h, p) and the final state."""
    b, _, h, p = x.shape
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype, device=x.device)
    return ScanFn.apply(x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                        initial_state.to(x.dtype).contiguous())


def step_(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
          C: torch.Tensor) -> torch.Tensor:
    """One decoding step, as :func:`arc.kernels.ssd_step_ref`: state (b, h, p, n) updated in place,
    x (b, h, p), dt (b, h) after softplus, A (h,), B and C (b, g, n). Returns y (b, h, p)."""
    dtype = state.dtype
    return module().step_(x.to(dtype).contiguous(), dt.to(dtype).contiguous(), A.to(dtype).contiguous(),
                          B.to(dtype).contiguous(), C.to(dtype).contiguous(), state)


class ConvFn(torch.autograd.Function):
    """``silu(causal depthwise conv(x) + bias)`` with its gradients: x (b, l, d), weight (d, w), bias (d,) or None."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias)
        return module().conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = module().conv_backward(x, weight, bias, dy.contiguous())
        return dx, dw, (db if bias is not None else None)


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """As :func:`arc.kernels.causal_conv1d_ref`, in float32 (float64 if x is): x (b, l, d),
    weight (d, 1, w), bias (d,) or None -> (b, l, d)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return ConvFn.apply(x.to(dtype).contiguous(), weight.squeeze(1).to(dtype).contiguous(),
                        None if bias is None else bias.to(dtype).contiguous())


class NormFn(torch.autograd.Function):
    """The gated RMSNorm ``rmsnorm(y * silu(z)) * weight`` per group, with its gradients."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):  # type: ignore[override]
        ctx.save_for_backward(y, z, weight)
        ctx.group_size, ctx.eps = group_size, eps
        return module().norm_forward(y, z, weight, group_size, eps)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        y, z, weight = ctx.saved_tensors
        dy, dz, dw = module().norm_backward(y, z, weight, ctx.group_size, ctx.eps, dout.contiguous())
        return dy, dz, dw, None, None


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """As :func:`arc.kernels.gated_rmsnorm`: computed in float32 (float64 if y is), returned in y's dtype."""
    wide = torch.promote_types(y.dtype, torch.float32)
    out = NormFn.apply(y.to(wide).contiguous(), z.to(wide).contiguous(), weight.to(wide).contiguous(), group_size, eps)
    return out.to(y.dtype)
