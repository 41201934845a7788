"""Which attempts to submit: voting against the product of the views' probabilities, with and
without the candidate search, on one checkpoint and the same tasks (issue 13's yardstick).

    python bench/bench_select.py --ckpt runs/cpu [--tasks 16] [--pick shortest|first|sample] [--seed 0]
                                 [--ttt_steps 0] [--views 8] [--search 0.1] [--json out.json] [--md docs/BENCHMARKS.md]

For each task (after test-time training on its demonstrations when --ttt_steps > 0, the same
fitted weights for every arm, restored afterwards): solve it twice with ``--select both``, which
records what each rule (vote, product, both) would have submitted: once with greedy candidates
(one per view) and once with the search (every grid above --search per view). The truth is read
only after the choices, to mark them. Reports per candidates x rule: tasks solved, score, and where
the truth was among the candidates (found at all, ranked first or second), and the seconds of
greedy decoding, of the search and of the scoring, so the cost of each setting is next to what it
buys. --json keeps every task's record (truth rank, number of candidates, times) for a per-task
reading of why a rule failed.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import emit, header
from bench_ttt import pick_tasks, picked, task_tokens
from arc import augment
from arc.candidates import SELECTS, by_select, product_score, view_scores
from arc.tokens import DoesNotFit, encode_prompt
from arc.evaluate import load_model
from arc.solve import SolveConfig, solve_task
from arc.ttt import TaskFineTuner, TTTConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="checkpoint (required unless --from_json)")
    ap.add_argument("--data", default="arc1")
    ap.add_argument("--split", default="eval")
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--pick", choices=["shortest", "first", "sample"], default="shortest")
    ap.add_argument("--seed", type=int, default=0, help="--pick sample: eval.py's --seed")
    ap.add_argument("--ttt_steps", type=int, default=0)
    ap.add_argument("--ttt_batch", type=int, default=4)
    ap.add_argument("--ttt_lr", type=float, default=3e-4)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--search", type=float, default=0.1)
    ap.add_argument("--score_max", type=int, default=SolveConfig.score_max, help="distinct grids scored per test input")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--arms", default="greedy,search", help="candidates to try: greedy (one per view), search (--search)")
    ap.add_argument("--truth_score", action="store_true",
                    help="also score each true output under every view (read after the choices, to see whether a wider "
                         "search would have found a grid the product prefers)")
    ap.add_argument("--from_json", default=None, help="render the table of a finished run's --json again, without solving")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        run = argparse.Namespace(**(saved["args"] | {"md": args.md}))
        model, _ = load_model(run.ckpt, torch.device("cpu"))
        emit(render(run, saved["records"], model.num_params()), args.md)
        return
    if not args.ckpt:
        ap.error("--ckpt is required (unless --from_json)")

    device = torch.device("cpu")
    model, _ = load_model(args.ckpt, device)
    tasks = pick_tasks(args)
    arms = {"greedy": SolveConfig(views=args.views, select="both", dtype=args.dtype, score_max=args.score_max),
            "search": SolveConfig(views=args.views, select="both", search=args.search, dtype=args.dtype, score_max=args.score_max)}
    unknown = set(args.arms.split(",")) - set(arms)
    if unknown:
        ap.error(f"--arms: unknown {sorted(unknown)}; choose from {list(arms)}")
    arms = {k: v for k, v in arms.items() if k in args.arms.split(",")}
    tuner = TaskFineTuner(model, TTTConfig(ttt_steps=args.ttt_steps, ttt_lr=args.ttt_lr, ttt_batch=args.ttt_batch,
                                           dtype=args.dtype)) if args.ttt_steps else None
    records = []
    for task in tasks:
        t0 = time.perf_counter()
        record = {"task_id": task.id, "tokens": task_tokens(task), "ttt_s": 0.0}
        try:
            if tuner is not None:
                record["ttt_s"] = tuner.fit(task, device)["seconds"]
            model.eval()
            for arm, cfg in arms.items():
                pred = solve_task(model, task, cfg, device)
                record[arm] = {"decode_s": pred.timings["decode"], "score_s": pred.timings["score"], "tokens": pred.generated_tokens,
                               "tests": [{k: t.info.get(k) for k in ("correct_by", "truth_rank", "votes", "search")}
                                         | {"candidates": len(t.info["ballots"]),
                                            "best_score": max((b["score"] for b in t.info["ballots"] if b.get("score") is not None), default=None)}
                                         for t in pred.tests]}
            if args.truth_score:  # measurement only, after every choice: how the views score the true output
                for k, pair in enumerate(task.test):
                    record.setdefault("truth_score", []).append(truth_score(model, task, k, arms["greedy"], device))
        finally:
            if tuner is not None:
                tuner.restore()
        records.append(record)
        marks = " ".join(f"{arm}:" + "".join("v" * any(t["correct_by"].get("vote", [])) + "p" * any(t["correct_by"].get("product", []))
                                            for t in record[arm]["tests"]) for arm in arms)
        print(f"{task.id}: {marks} truth rank {[t['truth_rank'] for arm in arms for t in record[arm]['tests']]} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "records": records}, f, indent=1)
    emit(render(args, records, model.num_params()), args.md)


def truth_score(model, task, k: int, cfg: SolveConfig, device: torch.device) -> float | None:
    """The product score (sum over the views of the log-probability) of test input k's true output,
    as the solver scores its candidates; None when a view cannot hold it."""
    views = []
    for view in augment.views(cfg.views, seed=cfg.seed, colours=cfg.colour_views):
        seen = view.apply_task(task)
        try:
            views.append((view, encode_prompt(seen.demos, seen.test[k].input, block_size=model.cfg.max_seq_len)))
        except DoesNotFit:
            pass
    score = product_score(view_scores(model, views, [task.test[k].output], device, dtype=cfg.dtype)[0])
    return score if score > float("-inf") else None


def render(args: argparse.Namespace, records: list[dict], params: int) -> str:
    """The markdown of a run: the command, the tasks, one row per candidates x rule, the search's cost."""
    arms = [a for a in ("greedy", "search") if a in getattr(args, "arms", "greedy,search").split(",")]
    n = len(records)
    lines = [header(f"python bench/bench_select.py --ckpt {args.ckpt} --tasks {args.tasks} --pick {args.pick}"
                    + (f" --seed {args.seed}" if args.pick == "sample" else "")
                    + f" --ttt_steps {args.ttt_steps} --views {args.views} --search {args.search} --dtype {args.dtype}"
                    + f" --score_max {getattr(args, 'score_max', 16)}"
                    + f" --arms {getattr(args, 'arms', 'greedy,search')}"),
             f"{n} {args.data} {args.split} tasks ({picked(args)}): {', '.join(r['task_id'] for r in records)}. "
             f"{params / 1e6:.2f}M parameters, {args.views} views, test-time training {args.ttt_steps} steps"
             + (f" (batch {args.ttt_batch}, lr {args.ttt_lr}, {sum(r['ttt_s'] for r in records) / n:.1f} s/task)" if args.ttt_steps else "") + ".", "",
             "| candidates | rule | tasks solved | score | test inputs with the truth among the candidates | ... ranked 1st / 2nd by product | decode s/task | scoring s/task |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        tests = [t for r in records for t in r[arm]["tests"]]
        found = sum(t["truth_rank"] is not None for t in tests)
        first = sum(t["truth_rank"] == 0 for t in tests)
        second = sum(t["truth_rank"] == 1 for t in tests)
        decode_s = sum(r[arm]["decode_s"] for r in records) / n
        score_s = sum(r[arm]["score_s"] for r in records) / n
        rules = by_select([r[arm]["tests"] for r in records])
        for rule in SELECTS:
            v = rules[rule]
            lines.append(f"| {arm}{f' >= {args.search}' if arm == 'search' else ''} | {rule} | {v['tasks_solved']}/{n} | "
                         f"{v['score']:.3f} | {found}/{len(tests)} | {first} / {second} | {decode_s:.1f} | "
                         f"{'0 (no scoring)' if rule == 'vote' else f'{score_s:.1f}'} |")
    if arms != ["greedy", "search"]:
        lines.append("")
    else:
        ratio = sum(r["search"]["decode_s"] for r in records) / max(sum(r["greedy"]["decode_s"] for r in records), 1e-9)
        worst = max(records, key=lambda r: r["search"]["decode_s"] / max(r["greedy"]["decode_s"], 1e-9))
        lines.append(f"\nThe search decodes in {ratio:.2f}x the time of greedy decoding over all tasks, at most "
                     f"{worst['search']['decode_s'] / max(worst['greedy']['decode_s'], 1e-9):.2f}x on one task ({worst['task_id']})"
                     + (f" (tokens fed: {sum(r['search']['tokens'] for r in records)} against {sum(r['greedy']['tokens'] for r in records)} greedy)."
                        if all("tokens" in r["greedy"] for r in records) else "."))
    if any("truth_score" in r for r in records):
        for arm in arms:
            pairs = [(ts, t) for r in records for ts, t in zip(r.get("truth_score", []), r[arm]["tests"]) if t["truth_rank"] is None]
            above = sum(ts is not None and t["best_score"] is not None and ts > t["best_score"] for ts, t in pairs)
            lines.append(f"{arm}: of the {len(pairs)} test inputs whose truth was not a candidate, the product scores the truth "
                         f"above every candidate in {above}: a wider search would have submitted it there.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
