"""Decoding benchmarks: the cache against recomputing the whole sequence per token, and the wall
time of solving ARC-AGI-1 evaluation tasks with 8 views.

    python bench/bench_decode.py cache [--prompts 512,2048,3072] [--new 32] [--md docs/BENCHMARKS.md]
    python bench/bench_decode.py solve --ckpt runs/cpu [--limit 20] [--views 8] [--dtypes float32,bfloat16] [--md ...]

cache  greedy constrained decoding of --new tokens after a prompt of each length, with the model's
       cache (prefill once, one step per token; arc.solve.decode) and without it (the whole
       sequence through the model for every token; arc.solve.decode_uncached, its reference twin),
       for the default CPU model (random weights: speed does not depend on them; both paths must
       produce the same tokens, which is checked). Timings include the prefill.
solve  eval.py's solver on the first --limit ARC-AGI-1 evaluation tasks with --views views: seconds
       per task, extrapolated to all 400 tasks (stated as such). With several --dtypes (decoding's
       autocast dtype, SolveConfig.dtype), every task is solved in each dtype in turn, in the same
       process after one untimed warm-up task per dtype, so a shared machine's load falls on all of
       them alike; each dtype's speed-up and how many attempt grids equal the first dtype's follow.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import emit, header
from arc.data import load_tasks
from arc.evaluate import load_model
from arc.loss import resolve_dtype
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


def cmd_solve(args) -> str:
    device = torch.device(args.device)
    model, ckpt = load_model(args.ckpt, device)
    tasks = load_tasks("arc1", "eval")[: args.limit]
    head = header(f"python bench/bench_decode.py solve --ckpt {args.ckpt} --limit {args.limit} --views {args.views} "
                  f"--dtypes {args.dtypes}")  # before the work: its load average is the one at the start
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    configs = {d: SolveConfig(views=args.views, dtype=d) for d in dtypes}  # validates each name
    resolved = {d: resolve_dtype(d, device) for d in dtypes}
    for cfg in configs.values():  # first calls pay for thread pools, allocations and the bf16 probe
        solve_tasks(model, tasks[:1], cfg, device=device, progress=False)
    seconds = {d: 0.0 for d in dtypes}
    preds: dict[str, list] = {d: [] for d in dtypes}
    for k, task in enumerate(tasks):
        print(f"task {k + 1}/{len(tasks)} {task.id}", flush=True)
        for d in dtypes:
            t0 = time.perf_counter()
            preds[d] += solve_tasks(model, [task], configs[d], device=device, progress=False)
            seconds[d] += time.perf_counter() - t0

    def attempts(d: str) -> list[np.ndarray]:
        return [grid for p in preds[d] for t in p.tests for grid in (t.attempt_1, t.attempt_2)]

    base = dtypes[0]
    lines = [head,
             f"Checkpoint `{ckpt['path']}` ({model.num_params() / 1e6:.2f}M parameters) on {device}; "
             f"{len(tasks)} tasks, {args.views} views, each dtype timed on the same tasks in turn.", "",
             f"| dtype | wall time | s/task | generated tokens/s | speed-up vs {base} | attempts identical to {base}'s "
             "| tasks solved | all 400 tasks (extrapolated) |", "|---|---|---|---|---|---|---|---|"]
    for d in dtypes:
        dt, tokens = seconds[d], sum(p.generated_tokens for p in preds[d])
        same = sum(np.array_equal(a, b) for a, b in zip(attempts(d), attempts(base)))
        solved = sum(all(c is True for c in p.correct) for p in preds[d])
        name = d if resolved[d] == d else f"{d} ({resolved[d]})"
        lines.append(f"| {name} | {dt:.0f} s | {dt / len(tasks):.1f} | {tokens / dt:,.0f} | **{seconds[base] / dt:.2f}x** | "
                     f"{same}/{len(attempts(base))} | {solved}/{len(tasks)} | ~{dt / len(tasks) * 400 / 60:.0f} min |")
    for d in dtypes[1:]:  # where the attempts differ: which, and the votes behind them in each dtype
        for p, q in zip(preds[base], preds[d]):
            for i, (a, b) in enumerate(zip(p.tests, q.tests)):
                for k in (1, 2):
                    if not np.array_equal(getattr(a, f"attempt_{k}"), getattr(b, f"attempt_{k}")):
                        lines.append(f"\n{d}: task {p.task_id} test {i} attempt {k} differs; votes per distinct grid "
                                     f"{a.info['votes']} in {base}, {b.info['votes']} in {d}.")
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
                                                    "bfloat16); speed-ups and identical attempts are against the first")
    for x in (c, s):
        x.add_argument("--md", default=None, help="append the markdown result to this file")
    args = p.parse_args()
    text = {"cache": cmd_cache, "solve": cmd_solve}[args.cmd](args)
    emit(text, args.md)


if __name__ == "__main__":
    main()
