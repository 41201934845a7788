"""Checkpoints: complete, atomic, and found from a run directory.

A checkpoint is one ``torch.save`` dict: ``model`` (state dict of the unwrapped module), ``model_config``
and ``train_config`` (plain dicts), ``optimizer``, ``step``, ``loader`` (its state), ``rng`` (torch CPU
and CUDA generator states), ``best_val`` and ``vocab_size``. It is written to a temporary file in the
same folder and renamed over the old one, so a kill at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

LATEST = "latest.pt"
BEST = "best.pt"


def save_atomic(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resolve(path: str | os.PathLike, which: str = LATEST) -> Path:
    """A checkpoint file, given the file itself or a run directory (its latest, or ``which``)."""
    p = Path(path)
    if p.is_dir():
        candidate = p / which
        if not candidate.exists():
            found = sorted(x.name for x in p.glob("*.pt"))
            raise FileNotFoundError(f"{p} has no {which}" + (f" (it has {', '.join(found)})" if found else " (no checkpoints at all)"))
        return candidate
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def load(path: str | os.PathLike, which: str = LATEST, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict; a file that is not one of ours gets an error naming it."""
    file = resolve(path, which)
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{file}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{file}: not a checkpoint of this project (no 'model' / 'model_config')")
    ckpt["path"] = str(file)
    return ckpt


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
