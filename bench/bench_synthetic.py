"""Learnability: train on the synthetic suite, then score exact match on fresh instances of each rule.

    python bench/bench_synthetic.py --minutes 10 --out runs/synthetic [--md docs/BENCHMARKS.md]

Trains the CPU model preset on ``synthetic:N`` tasks (every rule of arc/synthetic.py, seed 1337)
for a number of steps chosen to take about ``--minutes`` on this machine (measured on the first
steps), then solves ``--per-rule`` freshly generated tasks of each rule (another seed, never seen
in training) greedily on the original view and reports the share solved exactly.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import emit, header
from arc.model import preset
from arc.solve import SolveConfig, solve_tasks
from arc.synthetic import RULES, make_tasks
from arc.trainer import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time to aim for")
    p.add_argument("--tasks", type=int, default=20000, help="synthetic training tasks")
    p.add_argument("--per-rule", type=int, default=10, help="fresh held-out tasks per rule")
    p.add_argument("--model", default="cpu", help="model preset")
    p.add_argument("--tokens-per-step", type=int, default=4096, help="real tokens per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--out", default="runs/synthetic", help="run directory")
    p.add_argument("--md", default=None, help="append the markdown result to this file")
    args = p.parse_args()

    base = dict(data=f"synthetic:{args.tasks}", out=args.out, batch_size=16, max_tokens=8192,
                tokens_per_step=args.tokens_per_step, grad_accum=8, lr=args.lr, warmup=30, val_fraction=0.01,
                val_every=0, save_every=0, log_every=10)
    # time a few steps (after the first) to pick the step count that fits the budget
    stamps: list[float] = []
    train(TrainConfig(**{**base, "out": args.out + "-probe", "steps": 6, "progress": False, "overwrite": True}), preset(args.model),
          on_step=lambda step, loss: stamps.append(time.time()))
    per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    steps = max(10, int(args.minutes * 60 / per_step))
    print(f"{per_step:.2f} s/step measured -> {steps} steps", flush=True)

    t0 = time.time()
    result = train(TrainConfig(**{**base, "steps": steps}), preset(args.model))
    train_s = time.time() - t0

    fresh = make_tasks(args.per_rule * len(RULES), seed=424242)
    preds = solve_tasks(result.model, fresh, SolveConfig(views=1, batch=1), device=torch.device("cpu"), progress=True)
    per_rule: dict[str, list[bool]] = {}
    for task, pred in zip(fresh, preds):
        rule = task.source.split(":", 1)[1]
        per_rule.setdefault(rule, []).extend(bool(c) for c in pred.correct)
    mean = sum(sum(v) / len(v) for v in per_rule.values()) / len(per_rule)

    tokens = steps * args.tokens_per_step
    lines = [
        header(f"python bench/bench_synthetic.py --minutes {args.minutes:g} --tasks {args.tasks} --per-rule {args.per_rule}"),
        f"Model preset `{args.model}` ({result.model.num_params() / 1e6:.2f}M parameters), {steps} steps, "
        f"~{tokens / 1e6:.1f}M real tokens, {train_s / 60:.1f} min training; final training loss {result.losses[-1]:.4f}.",
        f"**Mean exact match over {len(per_rule)} rules: {mean:.1%}** (greedy, original view, "
        f"{args.per_rule} fresh tasks per rule).",
        "",
        "| rule | solved |",
        "|---|---|",
    ] + [f"| {rule} | {sum(v)}/{len(v)} |" for rule, v in sorted(per_rule.items())]
    emit("\n".join(lines), args.md)


if __name__ == "__main__":
    main()
