"""More than one answer per view, and every answer judged by every view.

Two ideas, both from the ARC Prize 2024 winners' write-ups (the ARChitects' depth-first sampling
and their later "product of experts" scoring), written here for our decoder and model:

1. :func:`search`: under one view, every output grid whose probability is at least ``threshold``
   (the probability under the constrained decoder: at each step the model's distribution
   renormalised over the tokens that keep the grid well formed, as :func:`arc.solve.teacher_forced`
   reads it). Because the prefixes of one length are disjoint events whose probabilities sum to at
   most one, at most ``1 / threshold`` of them can clear the bar, so a breadth-first walk over the
   prefixes, one batched decoding step per depth with the cache rows copied for each kept child,
   finds them all at a bounded cost. The greedy path is always followed as well
   (``keep_greedy``), so the greedy grid is among the results whatever the threshold and the
   search replaces the plain greedy decode instead of adding to it.
2. :func:`view_scores` and :func:`product_rank`: each distinct candidate grid (already mapped back
   to the task's frame) is transformed into every view and read by the model under teacher forcing
   after that view's prompt (all views' reads batched together); its score is the sum over views of
   its log-probability, i.e. the log of the product of the views' probabilities. A wrong grid that
   one view likes is rarely liked by all of them.

:func:`selections` turns the ranked ballots into the attempts of every selection rule (``vote``,
``product``, ``both``), so one run can report all three. Nothing here reads a test output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from arc import augment
from arc.loss import autocast_for
from arc.tokens import EOO, MIN_ANSWER_TOKENS, Encoded, LayoutTracker, grid_tokens
from arc.vote import Ballot

SELECTS: tuple[str, ...] = ("vote", "product", "both")


@dataclass(frozen=True)
class Found:
    """One answer of :func:`search`: generated ids through EOO and their summed log-probability."""

    ids: tuple[int, ...]
    logprob: float  # sum over the answer's tokens of log p(token) under the constrained distribution
    greedy: bool  # the greedy path's answer (every token the masked argmax)
    raw_logprob: float = 0.0  # the same sum under the model's unconstrained distribution, as decode reports it

    @property
    def mean_logprob(self) -> float:
        """Mean unconstrained log-probability per token: :func:`arc.solve.decode`'s figure, which the
        vote uses to break ties."""
        return self.raw_logprob / len(self.ids)


def _budgets(model: Any, prompts: Sequence[Encoded]) -> list[int]:
    """:func:`arc.solve.answer_budgets` (imported here: arc.solve imports this module)."""
    from arc.solve import answer_budgets

    return answer_budgets(model, prompts)


@torch.no_grad()
def search(
    model: Any,
    prompts: Sequence[Encoded],
    device: torch.device,
    *,
    threshold: float,
    max_candidates: int = 8,
    max_rows: int = 16,
    keep_greedy: bool = True,
    dtype: str = "float32",
) -> tuple[list[list[Found]], list[dict[str, Any]]]:
    """Every answer of each prompt with probability >= ``threshold`` (and the greedy answer when
    ``keep_greedy``), most probable first; and per prompt a record of the work done.

    Caps, per prompt: ``max_rows`` partial answers alive at one depth (beyond it the least probable
    are dropped; the greedy path never is) and ``max_candidates`` answers kept (the most probable,
    and the greedy one). ``truncated`` in the record says when a cap dropped something, so "every
    grid above the threshold" holds exactly when it is False. ``threshold`` above 1 finds nothing
    but the greedy answer, which is then exactly :func:`arc.solve.decode`'s (ties aside).
    """
    if not threshold > 0:
        raise ValueError(f"search: threshold must be > 0, got {threshold}")
    if max_candidates < 1 or max_rows < 1:
        raise ValueError(f"search: max_candidates and max_rows must be >= 1, got {max_candidates}, {max_rows}")
    n = len(prompts)
    budgets = _budgets(model, prompts)
    if min(budgets) < MIN_ANSWER_TOKENS:
        raise ValueError(f"search: a prompt leaves {min(budgets)} tokens for its answer (a grid needs {MIN_ANSWER_TOKENS})")
    floor = math.log(threshold)
    longest = max(len(p.ids) for p in prompts)
    room = max(len(p.ids) + b for p, b in zip(prompts, budgets)) - longest
    found: list[list[Found]] = [[] for _ in range(n)]
    records = [{"tokens": 0, "peak_rows": 1, "truncated": False} for _ in range(n)]
    with autocast_for(dtype, device):
        cache, logits = model.prefill([torch.as_tensor(p.ids, dtype=torch.long, device=device) for p in prompts], room,
                                      [torch.as_tensor(p.pos, dtype=torch.long, device=device) for p in prompts])
        layout = LayoutTracker([p.ids for p in prompts], budgets, device)
        # one entry per live row of the cache: its prompt, ids so far, summed log-probability, greedy flag
        owner, seqs, sums, raws, greedy = list(range(n)), [()] * n, [0.0] * n, [0.0] * n, [keep_greedy] * n
        while owner:
            raw = torch.log_softmax(logits.float(), -1)  # (R, V)
            logp = torch.log_softmax(logits.float().masked_fill(~layout.allowed(logits.size(-1)), -math.inf), -1)  # (R, V)
            best = logp.argmax(-1)  # (R,)
            total = torch.tensor(sums, dtype=torch.float64, device=logp.device)[:, None] + logp.double()  # (R, V)
            keep = total >= floor  # (R, V)
            for r in (r for r, g in enumerate(greedy) if g):
                keep[r, int(best[r])] = True
            children: dict[int, list[tuple[float, int, int, bool, float]]] = {}  # prompt -> (sum, row, token, greedy, raw)
            for r, t in torch.nonzero(keep).tolist():
                g = greedy[r] and t == int(best[r])
                s, rs = float(total[r, t]), raws[r] + float(raw[r, t])
                if t == EOO:
                    found[owner[r]].append(Found(seqs[r] + (t,), s, g, rs))
                else:
                    children.setdefault(owner[r], []).append((s, r, t, g, rs))
            parents, tokens = [], []
            for p, kids in children.items():
                if len(kids) > max_rows:  # keep the most probable, and the greedy child whatever its rank
                    kids.sort(key=lambda k: (not k[3], -k[0]))
                    records[p]["truncated"] = True
                    kids = kids[:max_rows]
                records[p]["peak_rows"] = max(records[p]["peak_rows"], len(kids))
                records[p]["tokens"] += len(kids)
                for s, r, t, g, rs in kids:
                    parents.append((p, seqs[r] + (t,), s, g, rs, r))
                    tokens.append(t)
            if not parents:
                break
            index = torch.tensor([q[5] for q in parents], dtype=torch.long, device=device)
            cache.select(index)
            layout.select(index)
            owner, seqs, sums, greedy, raws = ([q[i] for q in parents] for i in range(5))
            tok = torch.tensor(tokens, dtype=torch.long, device=device)
            logits = model.step(tok, cache, layout.advance(tok))  # (R, V)
    out = []
    for p, answers in enumerate(found):
        answers.sort(key=lambda f: (-f.logprob, f.ids))
        if len(answers) > max_candidates:
            records[p]["truncated"] = True
            kept = answers[:max_candidates]
            if not any(f.greedy for f in kept):
                kept[-1:] = [f for f in answers if f.greedy][:1] or kept[-1:]
            answers = kept
        records[p]["found"] = len(answers)
        out.append(answers)
    return out, records


# ---- scoring under every view ---------------------------------------------------------------------
def fits(model: Any, prompt: Encoded, grid: np.ndarray) -> bool:
    """Whether ``grid`` (already in the prompt's view) can follow ``prompt`` within the model's
    answer budget, as the decoder would have allowed it."""
    return len(grid_tokens(grid)) + 1 <= _budgets(model, [prompt])[0]


def _mapped(model: Any, views: Sequence[tuple[augment.Transform, Encoded]], grids: Sequence[np.ndarray]
            ) -> list[tuple[int, int, np.ndarray]]:
    """(grid index, view index, the grid in that view) for every pair whose mapped grid fits the view."""
    out = []
    for v, (view, prompt) in enumerate(views):
        for i, g in enumerate(grids):
            m = view.apply_grid(g)
            if fits(model, prompt, m):
                out.append((i, v, m))
    return out


@torch.no_grad()
def view_scores(model: Any, views: Sequence[tuple[augment.Transform, Encoded]], grids: Sequence[np.ndarray],
                device: torch.device, *, batch: int = 16, dtype: str = "float32") -> np.ndarray:
    """(len(grids), len(views)) float64: the log-probability of each grid (in the task's frame) under
    each view, read after the view's prompt with the grid mapped into the view, under the decoder's
    grammar (:func:`arc.solve.teacher_forced`: each prompt + answer read whole, ``batch`` sequences
    per forward pass); -inf where the mapped grid cannot fit the view's answer budget.

    Reading through the decoder's cache instead (each prompt prefilled once, its rows copied per
    candidate, the answers fed a token a step) was measured slower on a CPU, 0.8-0.9x
    (docs/BENCHMARKS.md section 11): one step's small operations cost more than re-reading the prompt.
    """
    from arc.solve import teacher_forced

    out = np.full((len(grids), len(views)), -math.inf)
    pairs = _mapped(model, views, grids)
    with autocast_for(dtype, device):
        forced = teacher_forced(model, [views[v][1] for _, v, _ in pairs], [m for _, _, m in pairs], device, batch=batch)
    for (i, v, _), f in zip(pairs, forced):
        out[i, v] = f.logprob
    return out


def product_score(row: np.ndarray) -> float:
    """A grid's score from its per-view log-probabilities: their exact sum (``math.fsum``, so the
    order of the views cannot change it); -inf when any view cannot hold the grid."""
    return math.fsum(row.tolist()) if np.all(np.isfinite(row)) else -math.inf


def product_rank(ballots: Sequence[Ballot], scores: Sequence[float]) -> list[int]:
    """Indices of ``ballots`` best first by score, then votes, then the vote order (itself total)."""
    return sorted(range(len(ballots)), key=lambda i: (-scores[i], -ballots[i].votes, i))


def _two(order: Sequence[int]) -> list[int]:
    return [order[0], order[1] if len(order) > 1 else order[0]]


def selections(ballots: Sequence[Ballot], scores: Sequence[float] | None) -> dict[str, list[int]]:
    """The two ballots (indices into ``ballots``, which are in vote order) each rule submits:
    ``vote`` the two most voted; ``product`` the two best scores; ``both`` the best score, then the
    most voted other grid (the best score's runner-up when the vote agrees). Only ``vote`` without
    scores. Empty ``ballots``: no rule has anything to submit."""
    if not ballots:
        return {}
    picks = {"vote": _two(range(len(ballots)))}
    if scores is not None:
        order = product_rank(ballots, scores)
        picks["product"] = _two(order)
        first = order[0]
        picks["both"] = [first, 0 if first != 0 else picks["product"][1]]
    return picks


def by_select(tasks: Sequence[Sequence[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """What each selection rule would have scored, from the tests' infos of each task (as
    :func:`arc.solve.solve_group` records them: ``correct_by``): per rule the official score (mean
    over tasks of the share of test inputs solved by either attempt) and the tasks solved. Tasks
    with a test output unknown are left out, as the official score leaves them out."""
    rules = sorted({r for tests in tasks for t in tests for r in t.get("correct_by", {})}, key=SELECTS.index)
    out: dict[str, dict[str, Any]] = {}
    for rule in rules:
        per_task = []
        for tests in tasks:
            if not tests or any("correct_by" not in t for t in tests):
                continue
            per_task.append(sum(any(t["correct_by"].get(rule, [False])) for t in tests) / len(tests))
        out[rule] = {"score": math.fsum(per_task) / len(per_task) if per_task else None,
                     "tasks_solved": sum(s == 1 for s in per_task), "tasks_scored": len(per_task)}
    return out
