"""The fast twin of the Mamba2 ops on a CPU: a C++ extension (``arc/csrc/ssd_cpu.cpp``) that runs the
scan's recurrence itself, forward and backward, one (batch row, head) per task on torch's threads,
the causal conv and the gated RMSNorm (forward and backward), and whole decoding steps of a mixer:
one token (:func:`mixer_step_`), T tokens from the states without changing them (:func:`mixer_extend`,
a speculative decoder's check) and the states moved past the tokens kept (:func:`mixer_commit_`).

It is compiled from source on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja; about
30 s once per machine, then cached under torch's extensions folder, or ``TORCH_EXTENSIONS_DIR``),
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


@torch._dynamo.assume_constant_result  # torch.compile: call it once while tracing, a constant after
def available() -> bool:
    """True when the C++ scan is built and loaded (builds it if not tried yet)."""
    return module() is not None


def reason() -> str:
    """Why the extension is or is not in use, for the one line arc.kernels logs."""
    if _module is not None:
        return "C++ recurrence scan (arc/csrc/ssd_cpu.cpp)"
    return _reason or "not built yet"


def outside_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when no gradient is wanted of ``tensors`` and torch.compile is not tracing: the extension
    can then be called without its custom-op wrapper (~10 us a call), and the one-call decoding
    steps, which have no backward and update their states in place, may run."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


# The ops are torch.library custom ops (forward and backward alike) with shape-only "fake" twins, so
# that torch.compile traces through them (one opaque node each) instead of breaking the graph.
@torch.library.custom_op("arc::ssd_scan", mutates_args=())
def _scan_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, state = module().forward(x, dt, A, B, C, state0)
    return y, state


@_scan_op.register_fake
def _(x, dt, A, B, C, state0):
    return torch.empty_like(x), torch.empty_like(state0)


@torch.library.custom_op("arc::ssd_scan_backward", mutates_args=())
def _scan_backward_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      state0: torch.Tensor, dy: torch.Tensor, dstate: torch.Tensor) -> list[torch.Tensor]:
    return list(module().backward(x, dt, A, B, C, state0, dy, dstate))


@_scan_backward_op.register_fake
def _(x, dt, A, B, C, state0, dy, dstate):
    return [torch.empty_like(t) for t in (x, dt, A, B, C, state0)]


def _scan_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _scan_backward(ctx, dy, dstate):
    """Exact gradients; the backward recomputes the states, nothing but the inputs is kept."""
    x, dt, A, B, C, state0 = ctx.saved_tensors
    dy = torch.zeros_like(x) if dy is None else dy.contiguous()
    dstate = torch.zeros_like(state0) if dstate is None else dstate.contiguous()
    return tuple(_scan_backward_op(x, dt, A, B, C, state0, dy, dstate))


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)


def scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan without the D skip, as :func:`arc.kernels.ssd_chunked_ref` computes it: x (b, l, h, p),
    dt (b, l, h) after softplus, A (h,), B and C (b, l, g, n), initial_state (b, h, p, n) or None.
    All in one floating dtype (float32 or float64). Returns y (b, l, h, p) and the final state."""
    b, _, h, p = x.shape
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype, device=x.device)
    args = (x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            initial_state.to(x.dtype).contiguous())
    if outside_autograd(*args):
        y, state = module().forward(*args)
        return y, state
    return _scan_op(*args)


def mixer_step_(zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_weight: torch.Tensor,
                conv_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                norm_weight: torch.Tensor, ngroups: int, eps: float) -> torch.Tensor:
    """One decoding step of a Mamba2 mixer after its in_proj, in one call: the conv step, softplus,
    the scan step with the D skip and the gated RMSNorm. zxbcdt (b, d_in_proj) in any dtype;
    conv_state (b, conv_dim, w-1) and ssm_state (b, h, p, n), both float32 (or float64) and
    contiguous, are updated in place; weights as in :class:`arc.mamba2.Mamba2` (conv_weight
    (conv_dim, 1, w)). Returns (b, d_inner) in the states' dtype."""
    return module().mixer_step_(*_mixer_args(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A, D, dt_bias,
                                             norm_weight), ngroups, eps)


def step_(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
          C: torch.Tensor) -> torch.Tensor:
    """One decoding step, as :func:`arc.kernels.ssd_step_ref`: state (b, h, p, n) updated in place,
    x (b, h, p), dt (b, h) after softplus, A (h,), B and C (b, g, n). Returns y (b, h, p)."""
    dtype = state.dtype
    return module().step_(x.to(dtype).contiguous(), dt.to(dtype).contiguous(), A.to(dtype).contiguous(),
                          B.to(dtype).contiguous(), C.to(dtype).contiguous(), state)


@torch.library.custom_op("arc::causal_conv", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv + bias): x (b, l, d), weight (w, d) taps-major, bias (d,) or None."""
    return module().conv_forward(x, weight, bias)


@_conv_op.register_fake
def _(x, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("arc::causal_conv_backward", mutates_args=())
def _conv_backward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      dy: torch.Tensor) -> list[torch.Tensor]:
    dx, dw, db = module().conv_backward(x, weight, bias, dy)
    return [dx, dw] + ([db] if bias is not None else [])


@_conv_backward_op.register_fake
def _(x, weight, bias, dy):
    return [torch.empty_like(x), torch.empty_like(weight)] + ([torch.empty_like(bias)] if bias is not None else [])


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, *([bias] if bias is not None else []))


def _conv_backward(ctx, dy):
    x, weight, *bias = ctx.saved_tensors
    grads = _conv_backward_op(x, weight, bias[0] if bias else None, dy.contiguous())
    return grads[0], grads[1], (grads[2] if ctx.has_bias else None)


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """As :func:`arc.kernels.causal_conv1d_ref`, in float32 (float64 if x is): x (b, l, d),
    weight (d, 1, w), bias (d,) or None -> (b, l, d)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    args = (x.to(dtype).contiguous(), weight.squeeze(1).t().to(dtype).contiguous(),  # (w, d): taps-major
            None if bias is None else bias.to(dtype).contiguous())
    return module().conv_forward(*args) if outside_autograd(*args) else _conv_op(*args)


def _mixer_args(zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_weight: torch.Tensor,
                conv_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                norm_weight: torch.Tensor) -> tuple:
    dtype = ssm_state.dtype
    return (zxbcdt.to(dtype).contiguous(), conv_state, conv_weight.squeeze(1).to(dtype).contiguous(),
            None if conv_bias is None else conv_bias.to(dtype).contiguous(), ssm_state, A.to(dtype).contiguous(),
            D.to(dtype).contiguous(), dt_bias.to(dtype).contiguous(), norm_weight.to(dtype).contiguous())


def mixer_extend(zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_weight: torch.Tensor,
                 conv_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                 norm_weight: torch.Tensor, ngroups: int, eps: float) -> torch.Tensor:
    """:func:`mixer_step_` for T tokens per sequence, zxbcdt (b, T, d_in_proj), one after another from
    the states, which are left unchanged: returns (b, T, d_inner), token t's output exactly as the
    t-th of T steps would give it."""
    return module().mixer_extend(*_mixer_args(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A, D, dt_bias,
                                              norm_weight), ngroups, eps)


def mixer_commit_(zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_weight: torch.Tensor,
                  conv_bias: torch.Tensor | None, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor,
                  norm_weight: torch.Tensor, ngroups: int, eps: float, counts: torch.Tensor) -> None:
    """The states advanced in place past the first ``counts[i]`` (b,) of the T tokens of sequence i
    (zxbcdt (b, T, d_in_proj)), as that many :func:`mixer_step_` calls would leave them."""
    module().mixer_commit_(*_mixer_args(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A, D, dt_bias,
                                        norm_weight), ngroups, eps, counts.to(torch.long).contiguous())


@torch.library.custom_op("arc::gated_norm", mutates_args=())
def _norm_op(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    return module().norm_forward(y, z, weight, group_size, eps)


@_norm_op.register_fake
def _(y, z, weight, group_size, eps):
    return torch.empty_like(y)


@torch.library.custom_op("arc::gated_norm_backward", mutates_args=())
def _norm_backward_op(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
                      dout: torch.Tensor) -> list[torch.Tensor]:
    return list(module().norm_backward(y, z, weight, group_size, eps, dout))


@_norm_backward_op.register_fake
def _(y, z, weight, group_size, eps, dout):
    return [torch.empty_like(y), torch.empty_like(z), torch.empty_like(weight)]


def _norm_setup(ctx, inputs, output) -> None:
    y, z, weight, group_size, eps = inputs
    ctx.save_for_backward(y, z, weight)
    ctx.group_size, ctx.eps = group_size, eps


def _norm_backward(ctx, dout):
    y, z, weight = ctx.saved_tensors
    dy, dz, dw = _norm_backward_op(y, z, weight, ctx.group_size, ctx.eps, dout.contiguous())
    return dy, dz, dw, None, None


_norm_op.register_autograd(_norm_backward, setup_context=_norm_setup)


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """As :func:`arc.kernels.gated_rmsnorm`: computed in float32 (float64 if y is), returned in y's dtype."""
    wide = torch.promote_types(y.dtype, torch.float32)
    args = (y.to(wide).contiguous(), z.to(wide).contiguous(), weight.to(wide).contiguous())
    out = module().norm_forward(*args, group_size, eps) if outside_autograd(*args) else _norm_op(*args, group_size, eps)
    return out.to(y.dtype)
