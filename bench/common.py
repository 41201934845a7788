"""What every benchmark prints with its figures: the machine, the commit, the date, the command,
and, for throughput figures, the machine's peak and the model FLOP utilisation against it."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from peak import Peak, measure_peak, mfu
from arc import alloc

alloc.tune()  # every benchmark runs with the allocator setting train.py and eval.py use (arc/alloc.py)


def load_note() -> str:
    """The 1/5/15-minute load averages: how busy the (shared) machine was around a figure."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"


def header(command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}{gpu}. "
            f"Commit {commit}{' + uncommitted changes' if dirty else ''}, {datetime.date.today()}; {load_note()} at start.\n"
            f"Command: `{command}`\n")


def peak_for(device: torch.device | str, seconds: float = 4.0, given_tflops: float | None = None) -> Peak:
    """The device's peak for MFU figures (measured now on a CPU; see bench/peak.py)."""
    return measure_peak(device, seconds, given_tflops)


def mfu_cell(flops_per_token: float, tokens_per_s: float, peak: Peak, dtype: str) -> str:
    """'x% (y% of <dtype> peak)': MFU against the machine's best peak, and against the peak of the
    dtype the run used when that differs."""
    best = mfu(flops_per_token, tokens_per_s, peak.best)
    own = mfu(flops_per_token, tokens_per_s, peak.of(dtype))
    if best is None:
        return "n/a (peak unknown)"
    if own is None or peak.of(dtype) == peak.best:
        return f"{best:.1%}"
    return f"{best:.1%} ({own:.1%} of the {dtype} peak)"


def timing_pos(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """2D position channels for a timing run on random ids x (B, T): the channels of BOS/PAD everywhere,
    since a step's cost does not depend on their values; None for a model without them."""
    from arc.tokens import NO_GRID_POS
    if not model.cfg.uses_positions:
        return None
    return torch.tensor(NO_GRID_POS, dtype=torch.long, device=x.device).repeat(*x.shape, 1)  # (B, T, N_POS)


def emit(text: str, md: str | None) -> None:
    """Print a result and append it to a markdown file if one is named."""
    print(text)
    if md:
        with open(md, "a") as f:
            f.write(text + "\n")
