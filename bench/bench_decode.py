"""Decoding benchmarks: the cache against recomputing the whole sequence per token, and the wall
time of solving ARC-AGI-1 evaluation tasks with 8 views.

    python bench/bench_decode.py cache [--prompts 512,2048,3072] [--new 32] [--md docs/BENCHMARKS.md]
    python bench/bench_decode.py solve --ckpt runs/cpu [--limit 20] [--views 8] [--dtypes float32,bfloat16]
                                       [--groups 1,8] [--batches 16,64] [--drafts 0,16] [--pieces 0,2048]
                                       [--compile none,blocks,model] [--md ...]

cache  greedy constrained decoding of --new tokens after a prompt of each length, with the model's
       cache (prefill once, one step per token; arc.solve.decode) and without it (the whole
       sequence through the model for every token; arc.solve.decode_uncached, its reference twin),
       for the default CPU model (random weights: speed does not depend on them; both paths must
       produce the same tokens, which is checked). Timings include the prefill.
solve  eval.py's solver on the first --limit ARC-AGI-1 evaluation tasks with --views views: seconds
       per task, extrapolated to all 400 tasks (stated as such). The arms are every combination of
       --dtypes (decoding's autocast dtype), --groups (tasks whose prompts share decoding batches),
       --batches (prompts a batch), --drafts (tokens guessed and checked at once, speculative
       decoding; 0 = one token a step), --pieces (the prefill's tokens at a time on a CPU,
       arc.model.PREFILL_TOKENS; 0 = no split) and --compile (torch.compile of the decoding calls,
       every dim dynamic: `blocks` each block's step and extend, `model` the model's step and extend
       whole; the seconds torch spends compiling are counted per arm, warm-up and timed tasks
       apart, since a new shape can recompile); every chunk of tasks is solved by each arm in turn, in the
       same process after one untimed warm-up task per arm, so a shared machine's load falls on all
       of them alike; each arm's speed-up and how many attempt grids equal the first arm's follow.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from common import emit, header
from arc.compiling import compile_seconds
from arc.data import load_tasks
from arc.evaluate import load_model
from arc.loss import resolve_dtype
import arc.model as model_module
from arc.model import HybridLM, preset
from arc.solve import SolveConfig, decode, decode_uncached, solve_tasks
from arc.tokens import MAX_GRID_TOKENS, Encoded, encode_prompt


def prompt_of_length(n: int, rng: np.random.Generator) -> Encoded:
    """A prompt of about n tokens: demonstrations of random 9-wide grids, then a 1x9 test input."""
    left = n - 13  # BOS, and IN <1 row of 9> OUT for the test input
    demos = []
    while left >= 23:  # a pair of r-row grids takes 20 r + 3 tokens
        r = min(30, (left - 3) // 20)
        demos.append((rng.integers(0, 10, (r, 9)), rng.integers(0, 10, (r, 9))))
        left -= 20 * r + 3
    return encode_prompt(demos, rng.integers(0, 10, (1, 9)), block_size=n + MAX_GRID_TOKENS)


def cmd_cache(args) -> str:
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = HybridLM(preset("cpu")).eval()
    rng = np.random.default_rng(0)
    warm = prompt_of_length(256, rng)  # first calls pay for thread pools and allocations: not timed
    decode(model, [warm], device, max_new_tokens=4)
    decode_uncached(model, [warm], device, max_new_tokens=4)
    rows = []
    for n in [int(x) for x in args.prompts.split(",")]:
        prompt = prompt_of_length(n, rng)
        t0 = time.perf_counter()
        fast = decode(model, [prompt], device, max_new_tokens=args.new)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = decode_uncached(model, [prompt], device, max_new_tokens=args.new)
        t_slow = time.perf_counter() - t0
        same = fast[0][0] == slow[0][0]
        rows.append((n, len(fast[0][0]), t_fast, t_slow, same))
    lines = [header(f"python bench/bench_decode.py cache --prompts {args.prompts} --new {args.new}"),
             f"Default CPU model ({model.num_params() / 1e6:.2f}M parameters), batch of one prompt, greedy.", "",
             "| prompt tokens | generated | with cache | recompute | speed-up | same tokens |", "|---|---|---|---|---|---|"]
    for n, g, tf, ts, same in rows:
        lines.append(f"| {n} | {g} | {tf:.2f} s | {ts:.2f} s | **{ts / tf:.1f}x** | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


COMPILES = ("none", "blocks", "model")


def decoding_calls(model: HybridLM, how: str) -> dict:
    """The functions the decoder calls for ``how`` (one of COMPILES): (owner, name) -> function, the
    eager methods for "none", their torch.compile wrappers (every dim dynamic, as on a CPU in
    arc.compiling) otherwise. :func:`use_calls` puts them in place."""
    if how == "none":  # None: the class's method, no instance attribute
        return {(o, name): None for o in [model, *model.layers] for name in ("step", "extend")}
    owners = list(model.layers) if how == "blocks" else [model]
    return {(o, name): torch.compile(getattr(type(o), name).__get__(o), dynamic=True)
            for o in owners for name in ("step", "extend")}


def use_calls(calls: dict) -> None:
    """Set (or, for None, remove) instance attributes that shadow the decoding methods."""
    for (owner, name), f in calls.items():
        if f is None:
            owner.__dict__.pop(name, None)
        else:
            owner.__dict__[name] = f


def cmd_solve(args) -> str:
    device = torch.device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    tasks = load_tasks("arc1", "eval")[: args.limit]
    head = header(f"python bench/bench_decode.py solve --ckpt {args.ckpt} --limit {args.limit} --views {args.views} "
                  f"--dtypes {args.dtypes} --groups {args.groups} --batches {args.batches} --drafts {args.drafts}"
                  + (f" --pieces {args.pieces}" if args.pieces else "")
                  + (f" --compile {args.compile}" if args.compile != "none" else ""))  # its load average: the start's
    arms = {}  # name -> SolveConfig, the Cartesian product of the lists, the first is the base
    pieces = {}  # name -> the prefill's tokens at a time (arc.model.PREFILL_TOKENS) for that arm
    compiles = {}  # name -> how its decoding calls are compiled (COMPILES)
    how_list = [x.strip() for x in args.compile.split(",") if x.strip()]
    for how in how_list:
        if how not in COMPILES:
            raise SystemExit(f"bench_decode.py: --compile takes {', '.join(COMPILES)}, got {how!r}")
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    for d, g, b, k, piece, how in itertools.product(
            [x.strip() for x in args.dtypes.split(",") if x.strip()], ints(args.groups), ints(args.batches),
            ints(args.drafts), ints(args.pieces or str(model_module.PREFILL_TOKENS)), how_list):
        name = d if resolve_dtype(d, device) == d else f"{d} ({resolve_dtype(d, device)})"
        name = (f"{name}, group {g}, batch {b}, draft {k}" + (f", prefill {piece or 'whole'}" if args.pieces else "")
                + (f", compiled {how}" if len(how_list) > 1 or how != "none" else ""))
        arms[name] = SolveConfig(views=args.views, dtype=d, group=g, batch=b, draft=k)  # validates
        pieces[name] = piece or 1 << 62
        compiles[name] = how
    calls = {how: decoding_calls(model, how) for how in set(compiles.values())}  # one set of wrappers per kind, kept
    compiling = {a: [0.0, 0.0] for a in arms}  # seconds torch spent compiling in each arm: warm-up, timed tasks

    def solve(a: str, chunk_tasks: list, timed: bool = True) -> list:
        model_module.PREFILL_TOKENS = pieces[a]
        use_calls(calls[compiles[a]])
        before = compile_seconds()
        try:
            return solve_tasks(model, chunk_tasks, arms[a], device=device, progress=False)
        finally:
            compiling[a][timed] += compile_seconds() - before
            use_calls(decoding_calls(model, "none"))

    for a in arms:  # first calls pay for thread pools, allocations, the bf16 probe and the first compile
        solve(a, tasks[:1], timed=False)
    seconds = {a: 0.0 for a in arms}
    preds: dict[str, list] = {a: [] for a in arms}
    chunk = max(cfg.group for cfg in arms.values())  # every arm solves the same chunk of tasks in turn
    for k in range(0, len(tasks), chunk):
        print(f"tasks {k + 1}-{min(k + chunk, len(tasks))}/{len(tasks)}", flush=True)
        for a in arms:
            t0 = time.perf_counter()
            preds[a] += solve(a, tasks[k:k + chunk])
            seconds[a] += time.perf_counter() - t0

    def attempts(a: str) -> list[np.ndarray]:
        return [grid for p in preds[a] for t in p.tests for grid in (t.attempt_1, t.attempt_2)]

    base = next(iter(arms))
    lines = [head,
             f"Checkpoint `{ckpt['path']}` ({model.num_params() / 1e6:.2f}M parameters) on {device}; "
             f"{len(tasks)} tasks, {args.views} views, every arm timed on the same tasks in turn ({chunk} at a time)."
             + ("" if set(compiles.values()) == {"none"} else
                " Compiled arms: torch's own compile seconds (arc.compiling.compile_seconds, an upper bound) in the untimed "
                "warm-up task and inside the timed tasks; the wall time includes the latter."), "",
             f"| arm (dtype, tasks decoded together, prompts a batch, tokens guessed at once"
             f"{', prefill tokens at a time' if args.pieces else ''}) | wall time | s/task | generated tokens/s | speed-up vs "
             f"the first | attempts identical to the first's | tasks solved | all 400 tasks (extrapolated) |",
             "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        dt, tokens = seconds[a], sum(p.generated_tokens for p in preds[a])
        same = sum(np.array_equal(x, y) for x, y in zip(attempts(a), attempts(base)))
        solved = sum(all(c is True for c in p.correct) for p in preds[a])
        lines.append(f"| {a} | {dt:.0f} s | {dt / len(tasks):.1f} | {tokens / dt:,.0f} | **{seconds[base] / dt:.2f}x** | "
                     f"{same}/{len(attempts(base))} | {solved}/{len(tasks)} | ~{dt / len(tasks) * 400 / 60:.0f} min |")
    for a in arms:
        if compiles[a] != "none":
            warm, timed = compiling[a]
            rest = seconds[a] - timed  # compile_seconds is an upper bound: it may leave nothing to divide by
            after = f"{rest:.0f} s, **{seconds[base] / rest:.2f}x** the first arm" if rest > 0 else "not measurable"
            lines.append(f"\n{a}: compiling {warm:.0f} s in the warm-up task and {timed:.0f} s inside the timed tasks; "
                         f"the timed tasks without the latter: {after}.")
    for a in list(arms)[1:]:  # where the attempts differ: which, and the votes behind them in each arm
        for p, q in zip(preds[base], preds[a]):
            for i, (x, y) in enumerate(zip(p.tests, q.tests)):
                for k in (1, 2):
                    if not np.array_equal(getattr(x, f"attempt_{k}"), getattr(y, f"attempt_{k}")):
                        lines.append(f"\n{a}: task {p.task_id} test {i} attempt {k} differs; votes per distinct grid "
                                     f"{x.info['votes']} in the first arm, {y.info['votes']} in this one.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="cached decoding vs recomputation")
    c.add_argument("--prompts", default="512,2048,3072", help="prompt lengths")
    c.add_argument("--new", type=int, default=32, help="tokens to generate")
    s = sub.add_parser("solve", help="wall time of solving ARC-AGI-1 eval tasks")
    s.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    s.add_argument("--limit", type=int, default=20, help="first N evaluation tasks")
    s.add_argument("--views", type=int, default=8, help="views per test input")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--dtypes", default="auto", help="decoding dtypes to compare, comma-separated (auto, float32, "
                                                    "bfloat16); speed-ups and identical attempts are against the first arm")
    s.add_argument("--groups", default=str(SolveConfig.group), help="tasks decoded together (SolveConfig.group), "
                   "comma-separated; the tasks are handed to every arm in chunks of the largest, so use divisors of it")
    s.add_argument("--batches", default=str(SolveConfig.batch), help="prompts a decoding batch (SolveConfig.batch), comma-separated")
    s.add_argument("--pieces", default=None, help="prefill tokens at a time to compare (arc.model.PREFILL_TOKENS; "
                   "0 = each length's prompts in one piece, as before the split), comma-separated; default: the constant. "
                   "CPU only: on a GPU the prefill never splits, so the arms are the same")
    s.add_argument("--drafts", default=str(SolveConfig.draft), help="tokens guessed and checked at once (SolveConfig.draft; "
                   "0 = one token a step), comma-separated")
    s.add_argument("--compile", default="none", help="decoding calls compiled, comma-separated: none, blocks (every "
                   "block's step and extend), model (the model's step and extend)")
    for x in (c, s):
        x.add_argument("--md", default=None, help="append the markdown result to this file")
    args = p.parse_args()
    text = {"cache": cmd_cache, "solve": cmd_solve}[args.cmd](args)
    emit(text, args.md)


if __name__ == "__main__":
    main()
