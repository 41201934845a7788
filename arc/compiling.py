"""``torch.compile`` as training and test-time training use it: one policy for the dims, one
counter for the seconds spent compiling (reported as ``compile_s``)."""
from __future__ import annotations

import torch


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile(model)`` sharing its weights. On a CPU every dim is dynamic from the start:
    the length buckets give a new (batch, length) almost every step, and starting static cost two
    extra ~40 s compiles before torch gave up specialising (measured on the cpu preset); a GPU keeps
    torch's default."""
    return torch.compile(model, dynamic=True if device.type == "cpu" else None)


def compile_seconds() -> float:
    """Seconds torch.compile has spent so far in this process by torch's own counters: dynamo's
    tracing and compiling of the forward graphs plus inductor's compiling of the backward ones (0.0
    where torch does not say). An upper bound: with dynamic shapes torch compiles the backward inside
    the forward's compile, so that part is counted twice (129 s counted against ~94 s of compiling
    measured by wall time, docs/BENCHMARKS.md section 16)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics as metrics
    except ImportError:
        return 0.0
    return float(sum(metrics.get("_compile.compile_inner", [])) + sum(metrics.get("compile_fx.<locals>.bw_compiler", [])))
