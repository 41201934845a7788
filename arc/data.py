"""ARC tasks: the Task/Pair values every other module uses.

(Loading, validation, overlap detection and the ``stats`` command are added below.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pair:
    """One input grid and its output grid (None when the output is unknown, e.g. a hidden test)."""

    input: np.ndarray  # (H, W) int64, values 0..9
    output: np.ndarray | None  # (H', W') int64, or None


@dataclass(frozen=True)
class Task:
    """An ARC task: demonstration pairs (``train``) and test pairs (``test``)."""

    id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    source: str = ""  # where it came from, for error messages: a file path or "arc1:eval"

    @property
    def demos(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Demonstrations as (input, output) tuples, the form arc.tokens takes."""
        return [(p.input, p.output) for p in self.train]
