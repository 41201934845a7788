"""Checkpoints: complete, atomic, and found from a run directory.

A checkpoint is one ``torch.save`` dict: ``model`` (state dict of the unwrapped module), ``model_config``
and ``train_config`` (plain dicts), ``optimizer``, ``step``, ``loader`` (its state), ``rng`` (torch CPU
and CUDA generator states), ``best_val``, ``val_loss`` and ``train_fingerprints`` (the sorted content
fingerprints, :func:`arc.data.task_fingerprint`, of the tasks trained on, test outputs included:
not the held-out validation tasks, nor ``--eval_demos``' leave-one-out tasks, which never hold an
evaluation test output; so evaluation can warn about tasks the model has seen). The training
config of an older checkpoint is read through :func:`arc.trainer.saved_train_config`. It is written through :mod:`arc.files` (a temporary file beside it,
renamed over the old one), so a kill at any moment leaves the previous checkpoint whole; the
temporary file a kill leaves behind is removed by the next save or load in that folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from arc import files

LATEST = "latest.pt"
BEST = "best.pt"


def save_atomic(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save ``payload`` to ``path`` atomically (and remove a killed earlier write's leftovers)."""
    with files.atomic_open(path) as f:
        torch.save(payload, f)


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
    for name in {LATEST, BEST, file.name}:
        files.clean_stale(file.parent / name)
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
