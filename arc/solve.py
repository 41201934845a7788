"""Solving tasks with a model: views, prompts, cached constrained decoding, inversion, votes.

For each test input of a task, the solver builds K views of the task (:func:`arc.augment.views`),
encodes each view's prompt (demonstrations + test input, up to the output marker), and decodes the
output grid token by token with the model's cache: one prefill per prompt, then one ``step`` per
token for all unfinished prompts together (the prompts of ``group`` tasks at once, shortest first,
``batch`` a batch: fewer, fuller steps; with ``draft``, several guessed tokens checked in one pass
where the guesses have been right, see :func:`decode`). Decoding is constrained so every result is a
well-formed grid: only colours, row end and end of output; every row as long as the first; at most
30 rows and 30 columns. Each grid is mapped back through its view's inverse transform and the
views vote (:func:`arc.vote.two_attempts`).

With ``search`` > 0 each view also gives every grid above that probability besides its greedy one
(:func:`arc.candidates.search`; the extra grids are candidates without a vote, so the vote is the
greedy vote's); with ``select`` product or both, each distinct grid is scored by
teacher forcing under every view and the attempts go to the best sum of log-probabilities
(:mod:`arc.candidates`). Every test's info records what each rule would have submitted.

The model is only asked for ``cfg.max_seq_len`` (the longest sequence it takes: prompts drop
demonstrations to leave room for an answer, and the answer ends within what is left),
``prefill(prompts, max_new_tokens, positions) -> (cache, logits)``, ``step(tokens, cache, pos) ->
logits`` and ``cache.select(index)``; ``positions``/``pos`` are the 2D channels of arc.tokens. A model
that also has ``extend`` and ``commit`` (:class:`arc.model.HybridLM`) gets speculative decoding.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import torch

from arc import augment, candidates, vote
from arc.config import help_field
from arc.data import Task
from arc.grid import same_grid
from arc.loss import DTYPES, autocast_for
from arc.tokens import (EOO, MAX_GRID_TOKENS, MIN_ANSWER_TOKENS, NO_GRID_POS, PAD, DoesNotFit, Encoded, LayoutTracker,
                        decode_grid, encode_prompt, grid_tokens)


# Why SolveConfig refuses compile=True (measured with bench/bench_decode.py solve --compile).
COMPILE_REFUSED = (
    "--compile: decoding is not compiled, because it does not pay: on a 2-core CPU, 24 ARC-AGI-1 tasks with 8 views "
    "took 1.04-1.05x less time compiled once the compiling was done (every block's step and extend, or the model's "
    "whole), but the compiling took 44-248 s in the same run (0.89x / 0.48x end to end); a decoding step is bound by "
    "reading the attention layers' KV caches, which compiling does not change (docs/BENCHMARKS.md section 21; not "
    "measured on a GPU). --ttt_compile true compiles test-time training, where it pays on long runs")


@dataclass(frozen=True)
class SolveConfig:
    views: int = help_field(8, "views voted over per test input: 1 = the original only, 8 = all rotations/reflections, "
                               "more add colour permutations")
    colour_views: bool = help_field(True, "views beyond 8 add colour permutations")
    batch: int = help_field(64, "prompts decoded together (at most; --search and --select product/both take at "
                                "most 16 a batch: each search prompt explores --search_rows rows, and scoring reads "
                                "whole sequences)")
    group: int = help_field(4, "tasks whose prompts share the decoding batches (sorted by length across them: "
                               "fewer, fuller decoding steps; 1.07-1.12x on a CPU, docs/BENCHMARKS.md section 13). "
                               "Greedy answers do not depend on it; test-time training and sampling "
                               "(--temperature > 0) solve one task at a time")
    draft: int = help_field(16, "greedy decoding guesses up to this many next tokens from the input grid or the row "
                                "above and checks them in one pass (speculative decoding: the same grids, one read of "
                                "the attention caches for several tokens; docs/BENCHMARKS.md section 15); 0 = one "
                                "token a step")
    temperature: float = help_field(0.0, "0 = greedy; > 0 samples")
    samples: int = help_field(1, "decodes per view when sampling (best-of-n by vote)")
    seed: int = help_field(0, "seed of the colour-permutation views and of sampling")
    dtype: Literal["auto", "float32", "bfloat16"] = help_field(
        "auto", "autocast dtype of decoding (and of test-time training), as train.py's --dtype: auto is bfloat16 on "
                "CUDA and on a CPU whose bf16 matmul a start-up probe measures clearly faster (arc/loss.py), else "
                "float32; weights, residual stream, norms and the output logits stay float32")
    select: Literal["vote", "product", "both"] = help_field(
        "vote", "how the two attempts are chosen: vote = most views agreeing; product = best sum over all views of "
                "each grid's log-probability (every distinct grid read under every view: costs forward passes); "
                "both = the product's best, then the vote's best other grid")
    search: float = help_field(0.0, "per view, every grid with at least this probability under the constrained "
                                    "decoder, besides the greedy one (0: the greedy grid only); e.g. 0.1. The extra "
                                    "grids get no vote: they matter with --select product or both")
    search_max: int = help_field(8, "--search: grids kept per view (the most probable, and the greedy one)")
    search_rows: int = help_field(16, "--search: partial grids explored at once per view (caps its cost)")
    score_max: int = help_field(64, "--select product/both: distinct grids scored per test input (the most voted first; "
                                    "64 = every grid a --search with the default --search_max finds under 8 views)")
    compile: bool = help_field(False, "torch.compile the decoding steps: refused, it does not pay (docs/BENCHMARKS.md "
                                      "section 21); --ttt_compile true compiles test-time training")

    def tasks_together(self, adapting: bool = False) -> int:
        """Tasks solved in one :func:`solve_group` call: ``group``, but one at a time with test-time
        training (each task has its own weights) or sampling (each task keeps its own random stream,
        so its samples do not depend on which tasks are solved with it, or on a resumed run)."""
        return 1 if adapting or self.temperature > 0 else self.group

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
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
        if self.draft < 0:
            raise ValueError(f"--draft must be >= 0 (tokens guessed at once; 0 = none), got {self.draft}")
        if self.group < 1:
            raise ValueError(f"--group must be >= 1 (tasks decoded together), got {self.group}")
        if self.select not in candidates.SELECTS:
            raise ValueError(f"--select must be one of {list(candidates.SELECTS)}, got {self.select!r}")
        if not 0 <= self.search <= 1:
            raise ValueError(f"--search must be a probability in [0, 1] (0: greedy only), got {self.search}")
        if self.search > 0 and self.temperature > 0:
            raise ValueError("--search and --temperature > 0 exclude each other: the search replaces sampling")
        for name in ("search_max", "search_rows", "score_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.compile:
            raise ValueError(COMPILE_REFUSED)


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
    generated_tokens: int  # answer tokens decoded (every explored branch under --search; drafted guesses not counted)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "decode" and "score" (product scoring)

    @property
    def correct(self) -> list[bool | None]:
        """Per test input: solved by either attempt (None without the truth)."""
        return [None if t.correct is None else any(t.correct) for t in self.tests]


# ---- constrained decoding -------------------------------------------------------------------------
def answer_budgets(model: Any, prompts: Sequence[Encoded], max_new_tokens: int = MAX_GRID_TOKENS) -> list[int]:
    """Tokens each prompt's answer may take: what the model's max_seq_len leaves, at most max_new_tokens."""
    return [min(max_new_tokens, model.cfg.max_seq_len - len(p.ids)) for p in prompts]


@torch.no_grad()
def decode(
    model: Any,
    prompts: Sequence[Encoded],
    device: torch.device,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    max_new_tokens: int = MAX_GRID_TOKENS,
    dtype: str = "float32",
    draft: int = 0,
) -> list[tuple[list[int], float]]:
    """Constrained decoding of a batch of prompts (from :func:`arc.tokens.encode_prompt`): each one's
    generated ids (through EOO) and the model's mean log-probability per generated token (from its
    unconstrained distribution). Each answer ends within :func:`answer_budgets`; a prompt whose budget
    cannot hold a 1x1 grid is an error (the solver never sends one).

    The prefill and every step run under :func:`arc.loss.autocast_for` ``dtype`` (float32: no
    autocast, the reference path); the mask, the argmax/sampling and the log-probabilities
    always work on float32 logits.

    ``draft`` > 0 (greedy only, a model with ``extend``/``commit``): speculative decoding. After each
    token, up to ``draft`` next tokens are guessed from the grid being written
    (:meth:`arc.tokens.LayoutTracker.guess`: the input cell under the cursor, or the row above),
    fed in one :meth:`~arc.model.HybridLM.extend`, and kept while each is the masked argmax there:
    the same tokens as one step at a time (up to rounding), with one read of the attention caches
    for several tokens. How many are guessed follows each sequence's current run of right guesses
    and what a check costs (:data:`VERIFY_COST`); where the guesses keep failing, plain steps."""
    budgets = answer_budgets(model, prompts, max_new_tokens)
    if min(budgets) < MIN_ANSWER_TOKENS:
        raise ValueError(f"decode: a prompt leaves {min(budgets)} tokens for its answer (a grid needs {MIN_ANSWER_TOKENS})")
    # One autocast context for the prefill and all steps: autocast keeps its bf16 copies of the
    # weights until the outermost context exits, so they are cast once per batch, not once per token.
    with autocast_for(dtype, device):
        if draft > 0 and temperature == 0 and hasattr(model, "extend"):
            return _decode_speculative(model, prompts, budgets, device, draft)
        return _decode_loop(model, prompts, budgets, device, temperature, generator)


def _start(model: Any, prompts: Sequence[Encoded], budgets: list[int], device: torch.device,
           ) -> tuple[Any, torch.Tensor, LayoutTracker]:
    """Prefill the prompts with room for every budget (the cache's capacity is the longest prompt +
    budget) and start their layouts: (cache, next-token logits (n, V), layout)."""
    longest = max(len(p.ids) for p in prompts)
    room = max(len(p.ids) + b for p, b in zip(prompts, budgets)) - longest  # the cache's slots beyond the longest prompt
    cache, logits = model.prefill([torch.as_tensor(p.ids, dtype=torch.long, device=device) for p in prompts], room,
                                  [torch.as_tensor(p.pos, dtype=torch.long, device=device) for p in prompts])
    return cache, logits, LayoutTracker([p.ids for p in prompts], budgets, device)


def _decode_loop(model: Any, prompts: Sequence[Encoded], budgets: list[int], device: torch.device,
                 temperature: float, generator: torch.Generator | None) -> list[tuple[list[int], float]]:
    """:func:`decode`'s work, under its autocast context (the model returns float32 logits)."""
    n = len(prompts)
    cache, logits, layout = _start(model, prompts, budgets, device)
    rows = torch.arange(n, device=device)  # which prompt each cache row belongs to
    generated: list[list[int]] = [[] for _ in range(n)]
    logprob_sum = [0.0] * n
    for _ in range(max(budgets)):
        logits = logits.float()  # (b, V)
        masked = logits.masked_fill(~layout.allowed(logits.size(-1)), -math.inf)
        if temperature > 0:
            probs = torch.softmax(masked / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (b,)
        else:
            tok = masked.argmax(dim=-1)  # (b,)
        tok_logprob = torch.log_softmax(logits, dim=-1).gather(1, tok.unsqueeze(1)).squeeze(1)  # (b,)
        for r, t, lp in zip(rows.tolist(), tok.tolist(), tok_logprob.tolist()):
            generated[r].append(t)
            logprob_sum[r] += lp
        pos = layout.advance(tok)  # (b, N_POS)
        if bool(layout.done.all()):
            break
        if bool(layout.done.any()):  # drop finished sequences from the batch
            keep = (~layout.done).nonzero().squeeze(1)
            cache.select(keep)
            layout.select(keep)
            rows, tok, pos = rows[keep], tok[keep], pos[keep]
        logits = model.step(tok, cache, pos)  # (b, V)
    return [(ids, lp / max(len(ids), 1)) for ids, lp in zip(generated, logprob_sum)]


# What checking drafted tokens costs on the CPU it was measured on (docs/BENCHMARKS.md section 16;
# section 15 measured (2.2, 0.17) before the Mamba2 layers' check became fused C++ steps), in
# decoding steps of the same batch: one HybridLM.extend + commit of T tokens ~ VERIFY_COST[0] +
# VERIFY_COST[1] * (T - 1) steps. The decoder checks drafts only when that is expected to pay.
VERIFY_COST = (1.9, 0.12)


def _verify_length(streak: torch.Tensor, draft: int, room: int) -> int:
    """Tokens to feed next (1 = a plain step): the T that maximises the expected tokens written per
    unit of cost, expecting each sequence to keep as many guesses as its current run of right ones
    (``streak``, at most ``draft``)."""
    rows = streak.numel()
    expect = streak.clamp(max=draft)
    best, best_t = float(rows), 1
    for k in sorted({min(draft, 2 ** i) for i in range(8)} | {draft}):
        if k < 1 or k > room:
            continue
        gain = (rows + int(expect.clamp(max=k).sum())) / (VERIFY_COST[0] + VERIFY_COST[1] * k)
        if gain > best:
            best, best_t = gain, k + 1
    return best_t


def _decode_speculative(model: Any, prompts: Sequence[Encoded], budgets: list[int], device: torch.device,
                        draft: int) -> list[tuple[list[int], float]]:
    """:func:`decode`'s greedy work with drafted tokens (``draft`` at most per verification)."""
    n = len(prompts)
    cache, logits, layout = _start(model, prompts, budgets, device)
    rows = torch.arange(n, device=device)  # which prompt each cache row belongs to
    ids = torch.full((n, cache.capacity), PAD, dtype=torch.long, device=device)  # every id so far, for the guesses
    for i, p in enumerate(prompts):
        ids[i, :len(p.ids)] = torch.as_tensor(p.ids, dtype=torch.long, device=device)
    streak = torch.zeros(n, dtype=torch.long, device=device)  # how many tokens in a row the guess was right
    generated: list[list[int]] = [[] for _ in range(n)]
    logprob_sum = [0.0] * n
    vocab = logits.size(-1)

    def drop_finished(*tensors: torch.Tensor) -> list[torch.Tensor] | None:
        """Drop finished sequences from the batch (and from ``tensors``, batch first); None when none is left."""
        nonlocal rows, ids
        if not bool(layout.done.any()):
            return list(tensors)
        keep = (~layout.done).nonzero().squeeze(1)
        if keep.numel() == 0:
            return None
        cache.select(keep)
        layout.select(keep)
        rows, ids = rows[keep], ids[keep]
        return [t[keep] for t in tensors]

    def record(tok: torch.Tensor, logits: torch.Tensor, which: torch.Tensor | None = None) -> None:
        lp = torch.log_softmax(logits, dim=-1).gather(1, tok.unsqueeze(1)).squeeze(1)  # (b,)
        chosen = range(len(tok)) if which is None else which.nonzero().squeeze(1).tolist()
        row_list, tok_list, lp_list = rows.tolist(), tok.tolist(), lp.tolist()
        for i in chosen:
            generated[row_list[i]].append(tok_list[i])
            logprob_sum[row_list[i]] += lp_list[i]

    while True:
        logits = logits.float()  # (b, V)
        tok = logits.masked_fill(~layout.allowed(vocab), -math.inf).argmax(dim=-1)  # (b,)
        streak = torch.where(layout.guess(ids) == tok, streak + 1, torch.zeros_like(streak))
        record(tok, logits)
        batch = torch.arange(len(tok), device=device)
        ids[batch, layout.at] = tok
        pos = layout.advance(tok)  # (b, N_POS)
        left = drop_finished(tok, pos, streak)
        if left is None:
            break
        tok, pos, streak = left
        t = _verify_length(streak, draft, cache.capacity - int(cache.lengths.max()) - 1)
        if t == 1:
            logits = model.step(tok, cache, pos)  # (b, V)
            continue
        # guess up to t - 1 tokens after tok, walking a copy of the layout along the guesses
        feed, feed_pos, masks, valid, states = [tok], [pos], [], [], [layout.state()]
        trial = copy.copy(layout)
        alive = torch.ones_like(tok, dtype=torch.bool)
        batch = torch.arange(len(tok), device=device)
        for _ in range(t - 1):
            guess = trial.guess(ids)  # (b,)
            allowed = trial.allowed(vocab)  # (b, V)
            alive = alive & (guess >= 0) & allowed.gather(1, guess.clamp(min=0)[:, None])[:, 0]
            if not bool(alive.any()):
                break
            guess = torch.where(alive, guess, torch.full_like(guess, EOO))  # any id where the guesses stopped
            ids[batch, trial.at.clamp(max=ids.shape[1] - 1)] = guess
            masks.append(allowed)
            valid.append(alive)
            feed.append(guess)
            feed_pos.append(trial.advance(guess))
            states.append(trial.state())
        if len(feed) == 1:  # no sequence had a guess the grammar allows
            logits = model.step(tok, cache, pos)  # (b, V)
            continue
        out, pending = model.extend(torch.stack(feed, 1), cache, torch.stack(feed_pos, 1))  # (b, T, V)
        out = out.float()
        kept = torch.zeros_like(tok)  # guesses kept per sequence
        alive = torch.ones_like(tok, dtype=torch.bool)
        for j in range(1, len(feed)):
            pick = out[:, j - 1].masked_fill(~masks[j - 1], -math.inf).argmax(dim=-1)
            alive = alive & valid[j - 1] & (pick == feed[j])
            if not bool(alive.any()):
                break
            record(feed[j], out[:, j - 1], alive)
            kept = kept + alive.long()
        model.commit(cache, pending, kept)
        layout.take(states, kept)
        streak = streak + kept
        left = drop_finished(out[batch, kept], streak)  # a kept EOO ends a grid
        if left is None:
            break
        logits, streak = left  # (b, V) after each sequence's last kept token
    return [(g, lp / max(len(g), 1)) for g, lp in zip(generated, logprob_sum)]


@torch.no_grad()
def decode_uncached(
    model: Any, prompts: Sequence[Encoded], device: torch.device, *, max_new_tokens: int = MAX_GRID_TOKENS
) -> list[tuple[list[int], float]]:
    """The reference twin of :func:`decode` (greedy only): no cache, the whole sequence (and its
    positions) is run through the model again for every new token. Slow by design; for parity tests
    and the benchmark."""
    results = []
    for prompt, budget in zip(prompts, answer_budgets(model, prompts, max_new_tokens)):
        seq = torch.as_tensor(prompt.ids, dtype=torch.long, device=device).unsqueeze(0)  # (1, L)
        seq_pos = torch.as_tensor(prompt.pos, dtype=torch.long, device=device).unsqueeze(0)  # (1, L, N_POS)
        layout = LayoutTracker([prompt.ids], [budget], device)
        ids, logprob_sum = [], 0.0
        for _ in range(budget):
            logits, _ = model(seq, pos=seq_pos)
            logits = logits[:, -1].float()  # (1, V)
            tok = logits.masked_fill(~layout.allowed(logits.size(-1)), -math.inf).argmax(dim=-1)  # (1,)
            logprob_sum += float(torch.log_softmax(logits, dim=-1)[0, tok])
            ids.append(int(tok))
            pos = layout.advance(tok)  # (1, N_POS)
            if bool(layout.done[0]):
                break
            seq = torch.cat([seq, tok.unsqueeze(0)], dim=1)
            seq_pos = torch.cat([seq_pos, pos.unsqueeze(0)], dim=1)
        results.append((ids, logprob_sum / max(len(ids), 1)))
    return results


@dataclass(frozen=True)
class Forced:
    """A known answer read by the model under teacher forcing, with the decoder's grammar mask."""

    exact: bool  # every answer token is the masked argmax: greedy decoding would write exactly this grid
    correct_tokens: int  # answer tokens (cells, ROW, EOO) that are the masked argmax
    tokens: int  # answer tokens
    logprob: float  # sum of the answer tokens' log-probabilities (masked distribution)


def answer_layouts(prompts: Sequence[Encoded], answers: Sequence[np.ndarray], budgets: Sequence[int], vocab: int
                   ) -> list[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Each answer grid as the decoder would write it after its prompt: (tail ids (A,) = the grid's
    tokens and EOO, their positions (A, N_POS) as :class:`LayoutTracker` gives them while decoding,
    and the grammar's allowed tokens before each (A, vocab) bool under the answer's budget). One
    tracker walks all answers together, a token of each per step."""
    tails = [np.append(grid_tokens(a), EOO) for a in answers]
    layout = LayoutTracker([p.ids for p in prompts], budgets)
    masks, positions = [[] for _ in tails], [[] for _ in tails]
    for t in range(max(len(tail) for tail in tails)):
        allowed = layout.allowed(vocab)  # (n, vocab)
        tok = torch.tensor([int(tail[t]) if t < len(tail) else EOO for tail in tails])  # finished rows repeat EOO
        pos = layout.advance(tok)  # (n, N_POS)
        for i, tail in enumerate(tails):
            if t < len(tail):
                masks[i].append(allowed[i])
                positions[i].append(pos[i])
    return [(tail, torch.stack(p).numpy(), torch.stack(m)) for tail, p, m in zip(tails, positions, masks)]


@torch.no_grad()
def _forward_rows(model: Any, seqs: list[tuple[np.ndarray, np.ndarray]], device: torch.device) -> list[torch.Tensor]:
    """The logits (T_i, V) float32 on the CPU of each sequence (ids (T_i,), 2D channels (T_i, N_POS)),
    run a few at a time: consecutive sequences padded together while the piece holds at most
    about :func:`arc.model.piece_tokens` tokens (one sequence at least; why: PREFILL_TOKENS's note)."""
    from arc.model import piece_tokens

    cap, out = piece_tokens(device), []
    start = 0
    while start < len(seqs):
        end, length = start + 1, len(seqs[start][0])
        while end < len(seqs) and (end - start + 1) * max(length, len(seqs[end][0])) <= cap:
            length = max(length, len(seqs[end][0]))
            end += 1
        x = torch.full((end - start, length), PAD, dtype=torch.long)
        pos = torch.tensor(NO_GRID_POS, dtype=torch.long).repeat(end - start, length, 1)  # (b, T, N_POS)
        for i, (ids, p) in enumerate(seqs[start:end]):
            x[i, :len(ids)], pos[i, :len(ids)] = torch.as_tensor(ids), torch.as_tensor(p)
        logits, _ = model(x.to(device), pos=pos.to(device))  # (b, T, V)
        logits = logits.float().cpu()
        out += [logits[i, :len(ids)] for i, (ids, _) in enumerate(seqs[start:end])]
        start = end
    return out


@torch.no_grad()
def teacher_forced(model: Any, prompts: Sequence[Encoded], answers: Sequence[np.ndarray], device: torch.device,
                   *, batch: int = 16) -> list[Forced]:
    """Read each answer grid after its prompt in one forward pass, under the decoder's grammar mask.

    ``exact`` equals "greedy :func:`decode` of this prompt writes exactly this answer" (the same
    prompt, positions, mask and budget; ties aside), at the cost of one forward pass instead of one
    step per token, which makes it the learning curves' metric; ``logprob`` scores a candidate grid.
    """
    results: list[Forced] = []
    vocab = model.cfg.vocab_size
    for start in range(0, len(prompts), batch):
        chunk = list(zip(prompts[start:start + batch], answers[start:start + batch]))
        layouts = answer_layouts([p for p, _ in chunk], [a for _, a in chunk], answer_budgets(model, [p for p, _ in chunk]), vocab)
        seqs = [(np.concatenate([p.ids, tail]), np.concatenate([p.pos, tail_pos])) for (p, _), (tail, tail_pos, _) in zip(chunk, layouts)]
        logits = _forward_rows(model, seqs, device)  # (T_i, V) each, float32 on the CPU
        for i, ((prompt, answer), (ids, _), (tail, _, mask)) in enumerate(zip(chunk, seqs, layouts)):
            n = len(prompt.ids)
            truth = torch.as_tensor(tail)  # (A,) the answer's tokens
            masked = logits[i][n - 1:len(ids) - 1].masked_fill(~mask, -math.inf)  # (A, V)
            hits = masked.argmax(-1) == truth
            logprob = float(torch.log_softmax(masked, -1).gather(1, truth[:, None]).sum())
            results.append(Forced(bool(hits.all()), int(hits.sum()), len(truth), logprob))
    return results


RUNNERS_UP = 6  # candidate grids kept in each test's info (best first by the rule used), for the report
HEAVY_BATCH = 16  # the most prompts a --search batch (each explores up to --search_rows rows) or a scoring batch takes


@dataclass
class _Job:
    test_index: int
    view: augment.Transform
    prompt: Encoded | None  # None when the view's prompt cannot fit the model
    reason: str | None = None
    results: list[tuple[list[int], float, int]] = field(default_factory=list, repr=False)  # (ids, mean log-prob, votes)
    search: dict[str, Any] | None = None  # candidates.search's record for this prompt
    fed: int = 0  # tokens fed to the model while decoding this prompt's answers


def _decode_jobs(model: Any, runnable: list[_Job], cfg: SolveConfig, device: torch.device) -> None:
    """Fill every job's results (greedy/sampled decoding, or the search) and its tokens fed, in
    batches of ``cfg.batch`` prompts (at most ``HEAVY_BATCH`` under the search) in the order given."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    size = min(cfg.batch, HEAVY_BATCH) if cfg.search > 0 else cfg.batch
    for start in range(0, len(runnable), size):
        chunk = runnable[start : start + size]
        prompts = [j.prompt for j in chunk]
        if cfg.search > 0:
            found, records = candidates.search(model, prompts, device, threshold=cfg.search, max_candidates=cfg.search_max,
                                               max_rows=cfg.search_rows, dtype=cfg.dtype)
            for job, answers, record in zip(chunk, found, records):
                job.results = [(list(f.ids), f.mean_logprob, int(f.greedy)) for f in answers]  # extras: no vote
                job.search = record
                job.fed = record["tokens"]
        else:
            for job, res in zip(chunk, decode(model, prompts, device, temperature=cfg.temperature,
                                             generator=generator, dtype=cfg.dtype, draft=cfg.draft)):
                job.results = [(*res, 1)]
                job.fed = len(res[0])


def _choose(model: Any, jobs: list[_Job], cfg: SolveConfig, device: torch.device, truth: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One test input's attempts from its jobs by ``cfg.select``, and its info: vote.two_attempts's,
    plus ``select``, ``picks`` (ballot indices each rule submits), ``order`` (ballot indices best first
    by the rule used), ``score_views`` and per-ballot ``score``/``view_logprobs`` when scored, the top
    ``RUNNERS_UP`` grids, and (after choosing, when the truth is known) ``correct_by`` rule and
    ``truth_rank``."""
    pool = []
    for job in jobs:
        if job.prompt is None:
            pool.append(vote.Candidate(None, -math.inf, str(job.view), job.reason))
        for ids, mean_lp, votes in job.results:
            out = decode_grid(ids)
            if out.ok:
                pool.append(vote.Candidate(job.view.invert_grid(out.grid), mean_lp, str(job.view), votes=votes))
            else:
                pool.append(vote.Candidate(None, mean_lp, str(job.view), out.reason, votes=votes))
    a1, a2, info = vote.two_attempts(pool)
    ballots = vote.rank(pool)
    info["select"] = cfg.select
    searched = [j.search for j in jobs if j.search is not None]
    if searched:
        info["search"] = {"tokens": sum(r["tokens"] for r in searched), "peak_rows": max(r["peak_rows"] for r in searched),
                          "truncated": any(r["truncated"] for r in searched)}
    scores = None
    if cfg.select != "vote" and ballots:
        scored_views, seen_views = [], set()
        for job in jobs:
            if job.prompt is not None and str(job.view) not in seen_views:  # --samples repeats a view
                seen_views.add(str(job.view))
                scored_views.append((job.view, job.prompt))
        top = ballots[: cfg.score_max]
        table = candidates.view_scores(model, scored_views, [b.grid for b in top], device,
                                       batch=min(cfg.batch, HEAVY_BATCH), dtype=cfg.dtype)
        scores = [candidates.product_score(row) for row in table] + [-math.inf] * (len(ballots) - len(top))
        info["score_views"] = [str(v) for v, _ in scored_views]
        for b, row, sc in zip(info["ballots"], table, scores):
            b["score"] = sc if math.isfinite(sc) else None
            b["view_logprobs"] = [x if math.isfinite(x) else None for x in row.tolist()]
    picks = candidates.selections(ballots, scores)
    info["picks"] = picks
    if picks:
        order = candidates.product_rank(ballots, scores) if cfg.select != "vote" else list(range(len(ballots)))
        info["order"] = order
        for i in order[:RUNNERS_UP]:
            info["ballots"][i]["grid"] = ballots[i].grid.tolist()
        a1, a2 = (ballots[k].grid.copy() for k in picks[cfg.select])
    if truth is not None:  # recorded after the choice: the truth never reaches it
        right = [same_grid(b.grid, truth) for b in ballots]
        info["correct_by"] = {rule: [right[k] for k in ks] for rule, ks in picks.items()}
        info["truth_rank"] = info["order"].index(right.index(True)) if any(right) else None
    return a1, a2, info


def _task_jobs(model: Any, task: Task, cfg: SolveConfig) -> list[_Job]:
    """One decoding job per (view, test input, sample); a job whose prompt cannot fit the model
    carries the reason instead of a prompt."""
    jobs: list[_Job] = []
    for view in augment.views(cfg.views, seed=cfg.seed, colours=cfg.colour_views):
        seen = view.apply_task(task)
        for i, test in enumerate(seen.test):
            try:
                prompt = encode_prompt(seen.demos, test.input, block_size=model.cfg.max_seq_len)
                jobs += [_Job(i, view, prompt) for _ in range(cfg.samples)]
            except DoesNotFit as e:
                jobs.append(_Job(i, view, None, f"prompt does not fit the model's max_seq_len {model.cfg.max_seq_len}: {e}"))
    return jobs


def solve_group(model: Any, tasks: Sequence[Task], cfg: SolveConfig, device: torch.device) -> list[TaskPrediction]:
    """Predict every test output of these tasks under cfg.views views and choose two attempts for
    each (by ``cfg.select``). The prompts of all the tasks are decoded together, shortest first, in
    batches of ``cfg.batch``; each task's ``seconds`` and ``timings["decode"]`` are its share of the
    shared decoding time, in proportion to its prompt and generated tokens."""
    t0 = time.time()
    jobs = [_task_jobs(model, task, cfg) for task in tasks]
    runnable = sorted((j for js in jobs for j in js if j.prompt is not None), key=lambda j: len(j.prompt.ids))
    _decode_jobs(model, runnable, cfg, device)
    decode_s = time.time() - t0
    work = [sum(len(j.prompt.ids) + j.fed for j in js if j.prompt is not None) for js in jobs]

    preds = []
    for task, task_jobs, w in zip(tasks, jobs, work):
        t_choose = time.time()
        tests = []
        for i, pair in enumerate(task.test):
            a1, a2, info = _choose(model, [j for j in task_jobs if j.test_index == i], cfg, device, pair.output)
            correct = None if pair.output is None else [same_grid(a, pair.output) for a in (a1, a2)]
            tests.append(TestPrediction(a1, a2, info, correct))
        share = decode_s * w / max(sum(work), 1) if len(tasks) > 1 else decode_s
        score_s = time.time() - t_choose
        preds.append(TaskPrediction(task.id, tests, share + score_s, sum(j.fed for j in task_jobs),
                                    {"decode": round(share, 3), "score": round(score_s, 3)}))
    return preds


def solve_task(model: Any, task: Task, cfg: SolveConfig, device: torch.device) -> TaskPrediction:
    """Predict every test output of a task under cfg.views views and choose two attempts for each
    (by ``cfg.select``)."""
    (pred,) = solve_group(model, [task], cfg, device)
    return pred


class Adapter(Protocol):
    """Something that changes the model for one task and undoes it (test-time training)."""

    def fit(self, task: Task, device: torch.device) -> dict[str, Any]: ...

    def restore(self) -> None: ...


def solve_tasks(model: Any, tasks: Sequence[Task], cfg: SolveConfig, *, device: torch.device,
                progress: bool = True, adapter: Adapter | None = None) -> list[TaskPrediction]:
    """Solve tasks with a progress bar (tasks done, running score, ETA), ``cfg.tasks_together()`` at
    a time (:func:`solve_group`).

    With an ``adapter``, each task is ``adapter.fit`` before it is solved and ``adapter.restore``
    after (one task at a time whatever ``cfg.group``); what ``fit`` returns is recorded in every
    test's info under ``"adapt"``."""
    was_training = model.training
    model.eval()
    results: list[TaskPrediction] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="solve" if adapter is None else "ttt+solve", unit="task", dynamic_ncols=True)
    scores: list[float] = []
    try:
        size = cfg.tasks_together(adapting=adapter is not None)
        for start in range(0, len(tasks), size):
            group = tasks[start:start + size]
            if adapter is None:
                preds = solve_group(model, group, cfg, device)
            else:
                (task,) = group
                t0 = time.time()
                try:
                    fitted = adapter.fit(task, device)
                    model.eval()
                    pred = solve_task(model, task, cfg, device)
                finally:
                    adapter.restore()
                pred.seconds = time.time() - t0
                for t in pred.tests:
                    t.info["adapt"] = fitted
                preds = [pred]
            for pred in preds:
                results.append(pred)
                known = [c for c in pred.correct if c is not None]
                if known and len(known) == len(pred.correct):
                    scores.append(sum(known) / len(known))
            if bar is not None:
                bar.set_postfix(score=f"{sum(scores) / max(len(scores), 1):.3f}", solved=f"{sum(s == 1 for s in scores)}")
                bar.update(len(preds))
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
