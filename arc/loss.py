"""The training objective and the precision policy: one home for both, shared by the training loop,
test-time training, evaluation and the benchmarks (none of which needs the others to compute a loss).

Loss: cross-entropy of the next token over target positions only (``y != IGNORE_INDEX``), in
float32 whatever the autocast dtype. :func:`loss_sum` is the sum, which is what gradient
accumulation and DDP need (divide once by the step's target count); :func:`mean_loss` is the
per-target-token mean every reported figure uses.

Precision: ``--dtype`` is ``float32``, ``bfloat16`` (autocast: matrix multiplies in bf16; weights,
residual stream, norms and the scan's decays stay float32) or ``auto``, resolved by
:func:`resolve_dtype`: bfloat16 on CUDA; on a CPU, bfloat16 where a measured probe finds its bf16
matrix multiply clearly faster than float32 (AVX-512-BF16 or AMX units), float32 elsewhere. The
probe runs once per process, the first time ``auto`` is resolved on a CPU, and its verdict is
logged once (:func:`cpu_bf16_verdict`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.nn.functional as F

from arc.tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16")


def loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over target tokens: logits (..., V), y (...) with IGNORE_INDEX off target.
    A float32 scalar; 0 when there is no target."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def target_count(y: torch.Tensor) -> int:
    """Number of target tokens in y."""
    return int((y != IGNORE_INDEX).sum())


def mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per target token (0, not NaN, when there is none)."""
    return loss_sum(logits, y) / max(target_count(y), 1)


def matmul_rate(dtype: torch.dtype, shape: tuple[int, int, int], seconds: float, device: torch.device | str = "cpu") -> float:
    """Best FLOP/s of an (m, k) @ (k, n) product in ``dtype`` on ``device``, timed repeatedly for
    about ``seconds`` on all of torch's threads (best, not mean: a shared machine only slows it)."""
    device = torch.device(device)
    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=gen).to(dtype)
    b = torch.randn(k, n, device=device, generator=gen).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # first call: allocation and kernel selection
    sync()
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        now = time.perf_counter()
        best = min(best, now - t0)
        if now - start >= seconds:
            return 2.0 * m * k * n / best


# The CPU probe: one product of the cpu preset's in_proj size, float32 and bf16 interleaved. bf16
# must beat float32 by this factor to be chosen: autocast adds casts that the matmul speed-up has
# to pay for, and a CPU without bf16 units (bf16 emulated) is slower than float32 by far.
PROBE_SHAPE = (1024, 256, 1024)
PROBE_SECONDS = 0.05  # per dtype and round
PROBE_ROUNDS = 3
BF16_MIN_SPEEDUP = 1.3


@dataclass(frozen=True)
class Bf16Verdict:
    """What the CPU probe found: whether ``auto`` means bfloat16 here, and why (for the log line)."""

    use_bf16: bool
    speedup: float | None  # bf16 FLOP/s / float32 FLOP/s, None when not measured
    reason: str


def _has_bf16_units() -> bool:
    """AVX-512-BF16 or AMX tiles, as torch reports them (False where torch cannot tell)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _measure_bf16_speedup() -> float:
    """bf16 over float32 matmul FLOP/s on this CPU, interleaved rounds, best of each."""
    f32 = bf16 = 0.0
    for _ in range(PROBE_ROUNDS):
        f32 = max(f32, matmul_rate(torch.float32, PROBE_SHAPE, PROBE_SECONDS))
        bf16 = max(bf16, matmul_rate(torch.bfloat16, PROBE_SHAPE, PROBE_SECONDS))
    return bf16 / f32


@functools.cache
def cpu_bf16_verdict() -> Bf16Verdict:
    """Whether ``--dtype auto`` runs bf16 autocast on this CPU: only with bf16 units and a measured
    bf16 matmul at least BF16_MIN_SPEEDUP x float32's. Measured once per process (~0.3 s), logged once."""
    if not _has_bf16_units():
        verdict = Bf16Verdict(False, None, "no AVX-512-BF16/AMX units reported by torch")
    else:
        speedup = _measure_bf16_speedup()
        ok = speedup >= BF16_MIN_SPEEDUP
        verdict = Bf16Verdict(ok, speedup, f"bf16 matmul measured {speedup:.2f}x float32's "
                                           f"({'>=' if ok else '<'} {BF16_MIN_SPEEDUP}x needed)")
    logger.info("precision: --dtype auto on this CPU is %s: %s", "bfloat16" if verdict.use_bf16 else "float32",
                verdict.reason)
    return verdict


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` -> the dtype used on ``device``: bfloat16 on CUDA, on a CPU whatever
    :func:`cpu_bf16_verdict` found, float32 elsewhere. Explicit dtypes are returned as given."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        if device.type == "cuda":
            return "bfloat16"
        if device.type == "cpu":
            return "bfloat16" if cpu_bf16_verdict().use_bf16 else "float32"
        return "float32"
    return dtype


def autocast_for(dtype: str, device: torch.device) -> ContextManager:
    """The autocast context of ``--dtype`` on ``device`` (a no-op for float32)."""
    if resolve_dtype(dtype, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
