"""Solving tasks with a model: views, prompts, cached constrained decoding, inversion, votes.

For each test input of a task, the solver builds K views of the task (:func:`arc.augment.views`),
encodes each view's prompt (demonstrations + test input, up to the output marker), and decodes the
output grid token by token with the model's cache: one prefill per prompt, then one ``step`` per
token for all unfinished prompts together. Decoding is constrained so every result is a
well-formed grid: only colours, row end and end of output; every row as long as the first; at most
30 rows and 30 columns. Each grid is mapped back through its view's inverse transform and the
views vote (:func:`arc.vote.two_attempts`).

The model is only asked for ``prefill(prompts, max_new_tokens) -> (cache, logits)``,
``step(tokens, cache) -> logits`` and ``cache.select(index)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from arc import augment, vote
from arc.config import help_field
from arc.data import Task
from arc.tokens import EOO, MAX_GRID_TOKENS, MAX_SIDE, N_COLOURS, ROW, DoesNotFit, decode_grid, encode_prompt


@dataclass(frozen=True)
class SolveConfig:
    views: int = help_field(8, "views voted over per test input: 1 = the original only, 8 = all rotations/reflections, "
                               "more add colour permutations")
    colour_views: bool = help_field(True, "views beyond 8 add colour permutations")
    batch: int = help_field(16, "prompts decoded together")
    temperature: float = help_field(0.0, "0 = greedy; > 0 samples")
    samples: int = help_field(1, "decodes per view when sampling (best-of-n by vote)")
    block_size: int = help_field(4096, "longest prompt plus answer")
    seed: int = help_field(0, "seed of the colour-permutation views and of sampling")

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"--views must be >= 1, got {self.views}")
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1 (decodes per view), got {self.samples}")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("--samples > 1 needs --temperature > 0 (greedy decoding repeats itself)")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")


@dataclass
class TestPrediction:
    attempt_1: np.ndarray
    attempt_2: np.ndarray
    info: dict[str, Any]  # from vote.two_attempts
    correct: list[bool] | None  # per attempt, None without the truth


@dataclass
class TaskPrediction:
    task_id: str
    tests: list[TestPrediction]
    seconds: float
    generated_tokens: int

    @property
    def correct(self) -> list[bool | None]:
        """Per test input: solved by either attempt (None without the truth)."""
        return [None if t.correct is None else any(t.correct) for t in self.tests]


# ---- constrained decoding -------------------------------------------------------------------------
class GridConstraint:
    """Which tokens keep a partial grid well formed, for a batch of sequences decoded together."""

    def __init__(self, n: int, device: torch.device):
        self.width = torch.zeros(n, dtype=torch.long, device=device)  # 0 until the first ROW
        self.col = torch.zeros(n, dtype=torch.long, device=device)  # cells in the current row
        self.rows = torch.zeros(n, dtype=torch.long, device=device)  # finished rows
        self.done = torch.zeros(n, dtype=torch.bool, device=device)

    def mask(self, vocab: int) -> torch.Tensor:
        """(n, vocab) bool: allowed next tokens."""
        n = self.width.numel()
        allowed = torch.zeros(n, vocab, dtype=torch.bool, device=self.width.device)
        limit = torch.where(self.width > 0, self.width, torch.full_like(self.width, MAX_SIDE))
        allowed[:, :N_COLOURS] = ((self.col < limit) & (self.rows < MAX_SIDE)).unsqueeze(1)
        allowed[:, ROW] = (self.col > 0) & ((self.width == 0) | (self.col == self.width))
        allowed[:, EOO] = (self.col == 0) & (self.rows > 0)
        allowed[self.done] = False
        allowed[self.done, EOO] = True  # finished sequences idle on EOO until they are dropped
        return allowed

    def update(self, tok: torch.Tensor) -> None:
        """Advance on the chosen tokens (n,)."""
        is_colour, is_row = tok < N_COLOURS, tok == ROW
        self.width = torch.where(is_row & (self.width == 0), self.col, self.width)  # the first row sets the width
        self.col = torch.where(is_colour, self.col + 1, torch.where(is_row, torch.zeros_like(self.col), self.col))
        self.rows = self.rows + is_row.long()
        self.done = self.done | (tok == EOO)

    def select(self, index: torch.Tensor) -> None:
        for name in ("width", "col", "rows", "done"):
            setattr(self, name, getattr(self, name)[index])


@torch.no_grad()
def decode(
    model: Any,
    prompts: Sequence[np.ndarray],
    device: torch.device,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    max_new_tokens: int = MAX_GRID_TOKENS,
) -> list[tuple[list[int], float]]:
    """Constrained decoding of a batch of prompts: each one's generated ids (through EOO) and the
    model's mean log-probability per generated token (from its unconstrained distribution)."""
    n = len(prompts)
    cache, logits = model.prefill([torch.as_tensor(p, dtype=torch.long, device=device) for p in prompts], max_new_tokens)
    rows = torch.arange(n, device=device)  # which prompt each cache row belongs to
    generated: list[list[int]] = [[] for _ in range(n)]
    logprob_sum = [0.0] * n
    constraint = GridConstraint(n, device)
    for _ in range(max_new_tokens):
        logits = logits.float()  # (b, V)
        allowed = constraint.mask(logits.size(-1))  # (b, V)
        masked = logits.masked_fill(~allowed, -math.inf)
        if temperature > 0:
            probs = torch.softmax(masked / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (b,)
        else:
            tok = masked.argmax(dim=-1)  # (b,)
        tok_logprob = torch.log_softmax(logits, dim=-1).gather(1, tok.unsqueeze(1)).squeeze(1)  # (b,)
        for r, t, lp in zip(rows.tolist(), tok.tolist(), tok_logprob.tolist()):
            generated[r].append(t)
            logprob_sum[r] += lp
        constraint.update(tok)
        if bool(constraint.done.all()):
            break
        if bool(constraint.done.any()):  # drop finished sequences from the batch
            keep = (~constraint.done).nonzero().squeeze(1)
            cache.select(keep)
            constraint.select(keep)
            rows, tok = rows[keep], tok[keep]
        logits = model.step(tok, cache)  # (b, V)
    return [(ids, lp / max(len(ids), 1)) for ids, lp in zip(generated, logprob_sum)]


@torch.no_grad()
def decode_uncached(
    model: Any, prompts: Sequence[np.ndarray], device: torch.device, *, max_new_tokens: int = MAX_GRID_TOKENS
) -> list[tuple[list[int], float]]:
    """The reference twin of :func:`decode` (greedy only): no cache, the whole sequence is run
    through the model again for every new token. Slow by design; for parity tests and the benchmark."""
    results = []
    for prompt in prompts:
        seq = torch.as_tensor(prompt, dtype=torch.long, device=device).unsqueeze(0)  # (1, L)
        constraint = GridConstraint(1, device)
        ids, logprob_sum = [], 0.0
        for _ in range(max_new_tokens):
            logits, _ = model(seq)
            logits = logits[:, -1].float()  # (1, V)
            tok = logits.masked_fill(~constraint.mask(logits.size(-1)), -math.inf).argmax(dim=-1)  # (1,)
            logprob_sum += float(torch.log_softmax(logits, dim=-1)[0, tok])
            ids.append(int(tok))
            constraint.update(tok)
            if bool(constraint.done[0]):
                break
            seq = torch.cat([seq, tok.unsqueeze(0)], dim=1)
        results.append((ids, logprob_sum / max(len(ids), 1)))
    return results


@dataclass
class _Job:
    test_index: int
    view: augment.Transform
    prompt: np.ndarray | None  # None when the view's prompt cannot fit the block
    reason: str | None = None
    result: tuple[list[int], float] | None = field(default=None, repr=False)


def solve_task(model: Any, task: Task, cfg: SolveConfig, device: torch.device) -> TaskPrediction:
    """Predict every test output of a task under cfg.views views and vote two attempts for each."""
    t0 = time.time()
    views = augment.views(cfg.views, seed=cfg.seed, colours=cfg.colour_views)
    jobs: list[_Job] = []
    for view in views:
        seen = view.apply_task(task)
        for i, test in enumerate(seen.test):
            try:
                prompt = encode_prompt(seen.demos, test.input, block_size=cfg.block_size).ids
                jobs += [_Job(i, view, prompt) for _ in range(cfg.samples)]
            except DoesNotFit as e:
                jobs.append(_Job(i, view, None, f"prompt does not fit: {e}"))
    runnable = sorted((j for j in jobs if j.prompt is not None), key=lambda j: len(j.prompt))
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    for start in range(0, len(runnable), cfg.batch):
        chunk = runnable[start : start + cfg.batch]
        for job, res in zip(chunk, decode(model, [j.prompt for j in chunk], device, temperature=cfg.temperature, generator=generator)):
            job.result = res
    generated = sum(len(j.result[0]) for j in runnable)

    tests = []
    for i, pair in enumerate(task.test):
        candidates = []
        for job in (j for j in jobs if j.test_index == i):
            if job.result is None:
                candidates.append(vote.Candidate(None, -math.inf, str(job.view), job.reason))
                continue
            ids, mean_lp = job.result
            out = decode_grid(ids)
            if out.ok:
                candidates.append(vote.Candidate(job.view.invert_grid(out.grid), mean_lp, str(job.view)))
            else:
                candidates.append(vote.Candidate(None, mean_lp, str(job.view), out.reason))
        a1, a2, info = vote.two_attempts(candidates)
        correct = None
        if pair.output is not None:
            correct = [a.shape == pair.output.shape and bool(np.array_equal(a, pair.output)) for a in (a1, a2)]
        tests.append(TestPrediction(a1, a2, info, correct))
    return TaskPrediction(task.id, tests, time.time() - t0, generated)


class Adapter(Protocol):
    """Something that changes the model for one task and undoes it (test-time training)."""

    def fit(self, task: Task, device: torch.device) -> dict[str, Any]: ...

    def restore(self) -> None: ...


def solve_tasks(model: Any, tasks: Sequence[Task], cfg: SolveConfig, *, device: torch.device,
                progress: bool = True, adapter: Adapter | None = None) -> list[TaskPrediction]:
    """Solve tasks one after another with a progress bar (tasks done, running score, ETA).

    With an ``adapter``, each task is ``adapter.fit`` before it is solved and ``adapter.restore``
    after; what ``fit`` returns is recorded in every test's info under ``"adapt"``."""
    was_training = model.training
    model.eval()
    results: list[TaskPrediction] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="solve" if adapter is None else "ttt+solve", unit="task", dynamic_ncols=True)
    scores: list[float] = []
    try:
        for task in tasks:
            t0 = time.time()
            try:
                fitted = adapter.fit(task, device) if adapter is not None else None
                model.eval()
                pred = solve_task(model, task, cfg, device)
            finally:
                if adapter is not None:
                    adapter.restore()
            if fitted is not None:
                pred.seconds = time.time() - t0
                for t in pred.tests:
                    t.info["adapt"] = fitted
            results.append(pred)
            known = [c for c in pred.correct if c is not None]
            if known and len(known) == len(pred.correct):
                scores.append(sum(known) / len(known))
            if bar is not None:
                bar.set_postfix(score=f"{sum(scores) / max(len(scores), 1):.3f}", solved=f"{sum(s == 1 for s in scores)}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return results


def submission_of(predictions: Sequence[TaskPrediction]) -> dict[str, list[dict[str, list[list[int]]]]]:
    """The Kaggle submission: {task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}."""
    return {
        p.task_id: [{"attempt_1": t.attempt_1.tolist(), "attempt_2": t.attempt_2.tolist()} for t in p.tests]
        for p in predictions
    }
