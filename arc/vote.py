"""Two attempts from many predictions: vote over grids predicted under different views of a task.

A solver predicts each test output several times (under dihedral transforms, colour permutations,
demonstration orders, several samples), maps every predicted grid back to the task's original
orientation and colours, and hands the results here as :class:`Candidate` values. Identical grids
pool their votes; the two best grids become attempt_1 and attempt_2.

Ranking, best first:

1. more votes (well-formed candidates with exactly this grid: shape and every cell; each candidate
   brings its ``votes``, 1 unless the solver says otherwise: the extra grids of a candidate search
   bring 0, so they compete only on scores and never outvote what the views' greedy grids agree on);
2. higher ``mean_logprob``: the *average* over the group's members (those with a vote, when
   there are any) of each member's mean log-probability per token. The average, not the maximum,
   so that one over-confident sample cannot lift a grid that the other views disagree with; at
   equal votes it orders groups exactly as the sum would. NaN counts as -inf;
3. a fixed order on the grids themselves (smaller shape first, then cells lexicographically),
   so the result does not depend on the order the candidates arrive in.

Averages are ``statistics.fmean`` (a ``math.fsum``, which is exact), so the order of candidates cannot
change a mean either.
This module knows nothing of models or transforms: only grids, scores and labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Sequence

import numpy as np

PLACEHOLDER = np.zeros((1, 1), dtype=np.int64)  # the attempt given when no candidate is a grid


@dataclass(frozen=True, eq=False)
class Candidate:
    """One prediction, already mapped back to the task's original orientation and colours.

    ``grid`` is None for a malformed prediction, and then ``reason`` says why.
    """

    grid: np.ndarray | None  # (H, W) int64 in the original task frame, or None
    mean_logprob: float = 0.0  # mean log-probability per generated token
    view: str = ""  # which view / transform / sample produced it, for the report
    reason: str | None = None  # why it is malformed; None for a grid
    votes: int = 1  # what it adds to its grid's vote count (0: a candidate, not a vote)

    def __post_init__(self) -> None:
        if self.votes < 0:
            raise ValueError(f"candidate {self.view!r}: votes must be >= 0, got {self.votes}")
        if self.grid is not None:
            grid = np.asarray(self.grid)
            if grid.ndim != 2 or grid.size == 0 or not np.issubdtype(grid.dtype, np.integer):
                raise ValueError(
                    f"candidate {self.view!r}: grid must be a non-empty 2-D integer array, got {grid.dtype} {grid.shape}"
                )
            object.__setattr__(self, "grid", np.ascontiguousarray(grid, dtype=np.int64))
        elif self.reason is None:
            object.__setattr__(self, "reason", "no grid")
        object.__setattr__(self, "mean_logprob", float(self.mean_logprob))

    @property
    def ok(self) -> bool:
        return self.grid is not None


@dataclass(frozen=True, eq=False)
class Ballot:
    """One distinct grid and the candidates that voted for it."""

    grid: np.ndarray  # (H, W) int64
    votes: int
    mean_logprob: float  # average of the members' mean log-probabilities (see module docstring)
    views: tuple[str, ...]  # the members' views, in the order the candidates came

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary without the grid (non-finite log-probabilities become None)."""
        return {
            "votes": self.votes,
            "mean_logprob": self.mean_logprob if math.isfinite(self.mean_logprob) else None,
            "shape": list(self.grid.shape),
            "views": list(self.views),
        }


def _rank_key(b: Ballot) -> tuple:
    lp = b.mean_logprob if not math.isnan(b.mean_logprob) else -math.inf
    return (-b.votes, -lp, b.grid.shape, b.grid.ravel().tolist())


def _exact_mean(values: list[float]) -> float:
    """:func:`statistics.fmean` (exact, whatever the order), NaN where it is undefined (+inf with -inf)."""
    try:
        return fmean(values)
    except (ValueError, OverflowError):  # inf + -inf; overflow needs |logprob| near 1e308
        return math.nan


def rank(candidates: Sequence[Candidate]) -> list[Ballot]:
    """Distinct well-formed grids, best first (see the module docstring); malformed ones are skipped."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in candidates:
        if c.grid is not None:
            groups.setdefault((c.grid.shape, c.grid.tobytes()), []).append(c)
    ballots = []
    for members in groups.values():
        voters = [c for c in members if c.votes > 0] or members  # extras (no vote) never move a voted grid's tie-break
        mean = _exact_mean([c.mean_logprob for c in voters])
        ballots.append(Ballot(members[0].grid.copy(), sum(c.votes for c in members), mean, tuple(c.view for c in members)))
    return sorted(ballots, key=_rank_key)


def two_attempts(candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """attempt_1, attempt_2 and a JSON-friendly ``info`` for the results and the report.

    The attempts are the two best ballots. attempt_2 repeats attempt_1 only when there is a single
    distinct grid; when no candidate is a grid both are the 1x1 ``[[0]]`` placeholder.
    ``info``: ``candidates`` (count), ``malformed`` (list of ``{"view", "reason"}``), ``votes``
    (every ballot's vote count, best first), ``ballots`` (``Ballot.to_dict`` of each, best first),
    ``repeated`` and ``placeholder`` (bools).
    """
    ballots = rank(candidates)
    info: dict[str, Any] = {
        "candidates": len(candidates),
        "malformed": [{"view": c.view, "reason": c.reason} for c in candidates if c.grid is None],
        "votes": [b.votes for b in ballots],
        "ballots": [b.to_dict() for b in ballots],
        "repeated": len(ballots) == 1,
        "placeholder": not ballots,
    }
    if not ballots:
        return PLACEHOLDER.copy(), PLACEHOLDER.copy(), info
    first = ballots[0].grid
    second = ballots[1].grid if len(ballots) > 1 else first
    return first.copy(), second.copy(), info
