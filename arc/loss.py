"""The training objective and the precision policy: one home for both, shared by the training loop,
test-time training, evaluation and the benchmarks (none of which needs the others to compute a loss).

Loss: cross-entropy of the next token over target positions only (``y != IGNORE_INDEX``), in
float32 whatever the autocast dtype. :func:`loss_sum` is the sum, which is what gradient
accumulation and DDP need (divide once by the step's target count); :func:`mean_loss` is the
per-target-token mean every reported figure uses.

Precision: ``--dtype`` is ``float32``, ``bfloat16`` (autocast: matrix multiplies in bf16; weights,
residual stream, norms and the scan's decays stay float32) or ``auto``, resolved by
:func:`resolve_dtype`. :func:`matmul_rate` measures a device's matrix-multiply speed per dtype.
"""
from __future__ import annotations

import contextlib
import time
from typing import ContextManager

import torch
import torch.nn.functional as F

from arc.tokens import IGNORE_INDEX

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


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` -> the dtype used on ``device``: bfloat16 on CUDA, float32 elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def autocast_for(dtype: str, device: torch.device) -> ContextManager:
    """The autocast context of ``--dtype`` on ``device`` (a no-op for float32)."""
    if resolve_dtype(dtype, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
